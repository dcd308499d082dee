"""UniPC (sdlite/schedulers/unipc.py): A1111's grid, parity with diffusers' ``UniPCMultistepScheduler``, the
order of convergence on Gaussian data with the exact denoiser, and the sampler through the pipeline.

Parity with diffusers, and where it cannot be exact: A1111 runs UniPC on a time-uniform grid of *fractional*
model times, t_i = start (1 - i/n), with log alpha_t linear in t between the integer timesteps (DPM-Solver's
discrete VP schedule). diffusers cannot evaluate there: ``set_timesteps`` rounds its timesteps to int64, the
network gets those integers, and its sigmas are interpolated *linearly in sigma* between integer timesteps. Its
``timestep_spacing="linspace"`` grid is A1111's rounded to integers (checked below), and with
``final_sigmas_type="sigma_min"`` it ends at t = 0 as A1111 does. So sdlite is run on diffusers' integer grid,
where both schedules are the model's own discrete values and the maths coincides; the update rule compared is
diffusers', unchanged. diffusers keeps the schedule in float32; its scheduler is handed the same float64 sigmas
(as ``exact_alphas`` does in test_schedulers.py), so that the float64 comparison measures the algorithm:
measured <= 1e-12 relative in float64 (asserted at 1e-10), <= 2.1e-6 in float32 (asserted at 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlite.errors import ArgumentError
from sdlite.infotext import parse_infotext
from sdlite.schedulers import Denoiser, DiscreteSchedule, get_sampler, parse_sampler_and_schedule, sample_unipc
from sdlite.schedulers.unipc import log_alpha

SCHED = DiscreteSchedule()
SHAPE = (2, 4, 8, 8)
PATTERN = torch.randn((1,) + SHAPE[1:], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
MIX = 0.2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

# The schedule written independently of sdlite: ½ log alphabar of ldm's "linear" betas, interpolated by numpy.
LDM_ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
HALF_LOG_ABAR = 0.5 * np.log(LDM_ALPHAS_CUMPROD)


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in network: a fixed random channel mix of x plus a pattern varying smoothly with t."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return (torch.einsum("ij,bjhw->bihw", MIX, x.double()) + 0.3 * torch.sin(t / 97.0 + 3.0 * PATTERN)).to(x.dtype)


def start_noise(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# -- A1111's grid ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3, 7, 20, 50])
def test_txt2img_grid_is_time_uniform_from_999_to_0_with_as_many_steps_as_ddim_timesteps(steps):
    """A1111 calls UniPC with steps = len(DDIM timesteps) (8 for 7 steps) and no t_start: t from 1 to 1/1000 in
    continuous time, i.e. model times 999 (1 - i/n)."""
    n = len(SCHED.ddim_timesteps(steps))
    levels = get_sampler("UniPC").levels(SCHED, steps)
    assert levels.dtype == torch.float64
    np.testing.assert_allclose(levels.numpy(), 999.0 * (1 - np.arange(n) / n), rtol=0, atol=1e-12)


def test_img2img_grid_starts_at_the_highest_ddim_timestep_kept_and_runs_t_enc_steps():
    """A1111: t_enc = int(0.6 * 20) = 12 steps; t_start = timesteps[t_enc - 1] / 1000 + 1/1000, i.e. model time
    551 (DDIM's 12th timestep from the bottom: 1, 51, ..., 551)."""
    levels = get_sampler("UniPC").levels(SCHED, 20, strength=0.6)
    np.testing.assert_allclose(levels.numpy(), 551.0 * (1 - np.arange(12) / 12), rtol=0, atol=1e-12)


def test_the_model_is_called_once_per_step_at_the_unrounded_grid_times():
    """The corrector's model call at the predicted point is the next step's history value; the last step (to
    t = 0) calls no model."""
    levels = get_sampler("UniPC").levels(SCHED, 10)
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return toy_model(x, t)

    get_sampler("UniPC").sample(Denoiser(model, SCHED, "eps"), start_noise(), levels)
    assert calls == pytest.approx(levels.tolist(), abs=1e-4)  # float32 t: 899.1 is 899.0999755859375


def test_log_alpha_is_half_log_alphabar_linear_between_integer_timesteps():
    for t in (0.0, 0.25, 10.0, 500.7, 949.05, 999.0):
        assert log_alpha(SCHED, t) == pytest.approx(np.interp(t, np.arange(1000), HALF_LOG_ABAR), rel=1e-12)


def test_v_output_at_a_fractional_time_is_converted_with_alphabar_at_the_integer_part():
    """A1111's CompVisTimestepsVDenoiser reads alphas_cumprod[t.to(int)] while the UNet gets t unrounded."""
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = start_noise(torch.float64)
    seen = []
    den = Denoiser(lambda x_in, t: seen.append(t[0].item()) or v, SCHED, "v")
    a = LDM_ALPHAS_CUMPROD[500]
    torch.testing.assert_close(den.eps(x, 500.75), math.sqrt(a) * v + math.sqrt(1 - a) * x, rtol=1e-12, atol=1e-12)
    assert seen == [500.75]


# -- parity with diffusers -------------------------------------------------------------------------------------

def diffusers_unipc(diffusers, n: int, prediction: str, **config):
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon" if prediction == "eps" else "v_prediction", predict_x0=True,
        timestep_spacing="linspace", final_sigmas_type="sigma_min", **config)
    sched.set_timesteps(n)
    # The same float64 sigmas, of the visited timesteps and of t = 0 where the run ends (see the docstring).
    sched.sigmas = torch.cat([SCHED.sigmas[sched.timesteps], SCHED.sigmas[:1]])
    return sched


def run_diffusers(sched, x: torch.Tensor) -> torch.Tensor:
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t.double().expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("n", [10, 25, 50])
def test_diffusers_linspace_timesteps_are_the_a1111_grid_rounded(n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers_unipc(diffusers, n, "eps", solver_order=3, solver_type="bh1")
    assert get_sampler("UniPC").levels(SCHED, n).round().long().tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 25])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_a1111_default_unipc_matches_diffusers_bh1_order_3_lower_order_final(n, prediction, dtype, tol):
    """A1111's defaults: variant bh1, order 3, lower order final, data prediction; n < 3 lowers the order
    (A1111 asserts there; diffusers lowers it as sdlite does)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers_unipc(diffusers, n, prediction, solver_order=3, solver_type="bh1", lower_order_final=True)
    noise = start_noise(dtype)
    ours = get_sampler("UniPC").sample(Denoiser(toy_model, SCHED, prediction), noise, sched.timesteps)
    assert rel_err(ours, run_diffusers(sched, noise)) <= tol


@pytest.mark.parametrize("order,variant,lower_order_final", [(3, "bh2", True), (2, "bh1", True), (2, "bh2", True),
                                                             (3, "bh1", False), (1, "bh1", True)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_other_orders_and_variants_match_diffusers(order, variant, lower_order_final, prediction):
    diffusers = pytest.importorskip("diffusers")
    n = 12
    sched = diffusers_unipc(diffusers, n, prediction, solver_order=order, solver_type=variant,
                            lower_order_final=lower_order_final)
    noise = start_noise(torch.float64)
    ours = sample_unipc(Denoiser(toy_model, SCHED, prediction), noise, sched.timesteps, order=order, variant=variant,
                        lower_order_final=lower_order_final)
    assert rel_err(ours, run_diffusers(sched, noise)) <= 1e-10


def test_an_unknown_variant_is_rejected():
    with pytest.raises(ArgumentError, match="bh1"):
        sample_unipc(Denoiser(toy_model, SCHED, "eps"), start_noise(), torch.tensor([999.0, 500.0]), variant="bh3")


# -- convergence on Gaussian data ------------------------------------------------------------------------------

S_DATA = 0.5  # data x0 ~ N(0, S_DATA^2 I)


def abar(t):
    return np.exp(2 * np.interp(t, np.arange(1000), HALF_LOG_ABAR))


def gaussian_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact eps-prediction for x0 ~ N(0, s^2 I): E[eps | x_t] = sqrt(1 - abar) x_t / (abar s^2 + 1 - abar),
    with abar_t of the schedule UniPC integrates (log alpha linear between integer timesteps)."""
    a = torch.from_numpy(abar(t.double().numpy())).reshape(-1, 1, 1, 1)
    return (torch.sqrt(1 - a) * x_t.double() / (a * S_DATA**2 + 1 - a)).to(x_t.dtype)


def flow_error(sampler_fn, levels: torch.Tensor, **kw) -> float:
    """Relative error of the final latent against the exact probability-flow map of Gaussian data, which is a
    pure scaling: x_0 = x_start sqrt(v_0 / v_start), v_t = abar_t s^2 + 1 - abar_t (the variance of x_t)."""
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler_fn(Denoiser(gaussian_eps, SCHED, "eps"), x, levels, **kw)
    var = lambda t: abar(t) * S_DATA**2 + 1 - abar(t)  # noqa: E731
    return rel_err(out, x * math.sqrt(var(0.0) / var(float(levels[0]))))


def lambda_uniform_grid(n: int) -> torch.Tensor:
    """n step starts uniform in lambda = log(alpha / sigma) from t = 999 to t = 0 (the end, left out)."""
    def lam(t):
        la = np.interp(t, np.arange(1000), HALF_LOG_ABAR)
        return la - 0.5 * np.log(-np.expm1(2 * la))
    la = -0.5 * np.log1p(np.exp(-2 * np.linspace(lam(999.0), lam(0.0), n + 1)[:-1]))
    return torch.from_numpy(np.interp(la, HALF_LOG_ABAR[::-1], np.arange(999, -1, -1, dtype=np.float64)))


@pytest.mark.parametrize("lower_order_final,low,high", [(False, 3.5, 4.5), (True, 1.8, 2.3)])
def test_unipc_3_converges_at_order_4_and_lower_order_final_at_order_2(lower_order_final, low, high):
    """On steps uniform in lambda, UniPC-3 (corrector included) has order p + 1 = 4: each doubling of the steps
    from 40 to 320 divides the error by 2^3.76, 2^3.99, 2^4.27 (measured). A1111's default lower order final
    makes the last step first order (local error O(h^2)), and the global order 2: 2^2.20, 2^2.12, 2^2.05."""
    errors = [flow_error(sample_unipc, lambda_uniform_grid(n), lower_order_final=lower_order_final)
              for n in (40, 80, 160, 320)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(low <= r <= high for r in rates), (errors, rates)


def test_on_a1111_grid_unipc_beats_ddim_at_the_same_steps_and_improves_with_steps():
    """On A1111's own grids (UniPC: time-uniform to 0; DDIM: its integer timesteps to t = 0), one model call per
    step each. Measured errors, UniPC vs DDIM: 10 steps 0.137 vs 0.192, 20: 0.059 vs 0.106, 40: 0.025 vs
    0.057, 100: 0.0079 vs 0.024. UniPC's rate on this grid is only ~1.2-1.7 per doubling: a time-uniform grid
    makes the last step (t = 999/n to 0) long in lambda, ½ log(999/n + 1), which shrinks only logarithmically."""
    unipc, ddim = get_sampler("UniPC"), get_sampler("DDIM")
    errors = []
    for steps in (10, 20, 40, 100):
        e_unipc = flow_error(unipc.fn, unipc.levels(SCHED, steps))
        e_ddim = flow_error(ddim.fn, ddim.levels(SCHED, steps))
        assert e_unipc < 0.75 * e_ddim, (steps, e_unipc, e_ddim)
        errors.append(e_unipc)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0]


# -- the pipeline ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from sdlite import devices
    from sdlite.clip import tokenizer_for
    from sdlite.pipeline import Pipeline

    from factory import TINY_SD1, random_networks

    nets = random_networks(TINY_SD1, 0)
    return Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1,
                    devices.Precision(torch.device("cpu"), torch.float32), name="tiny")


def test_pipeline_txt2img_with_unipc_is_seed_deterministic_and_its_infotext_round_trips(pipe):
    a = pipe.txt2img("a cat", seed=3, steps=3, sampler="UniPC")
    c = pipe.txt2img("a cat", seed=4, steps=3, sampler="UniPC")
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert "Sampler: UniPC," in a.infotexts[0] and "Schedule type" not in a.infotexts[0]
    params = parse_infotext(a.infotexts[0])
    sampler, schedule = parse_sampler_and_schedule(params["Sampler"], params["Schedule type"])
    assert (sampler.id, schedule) == ("unipc", "automatic")
    again = pipe.txt2img("a cat", seed=int(params["Seed"]), steps=int(params["Steps"]), sampler=sampler.id,
                         schedule=schedule, guidance_scale=float(params["CFG scale"]))
    assert np.array_equal(np.asarray(again[0]), np.asarray(a[0]))  # by id "unipc", from the infotext's values


def test_pipeline_img2img_with_unipc_runs_the_strength_share_of_the_steps(pipe):
    init = pipe.txt2img("a cat", seed=3, steps=1, sampler="Euler")[0]
    seen = []
    out = pipe.img2img(init, "a dog", strength=0.5, seed=1, steps=10, sampler="UniPC",
                       callback=lambda i, t, x: seen.append(t))
    assert len(out) == 1 and seen == pytest.approx([401.0 * (1 - i / 5) for i in range(5)])
    assert parse_infotext(out.infotexts[0])["Sampler"] == "UniPC"


def test_web_ui_lists_unipc_as_a1111_does(tmp_path):
    """A1111's /sdapi/v1/samplers entry: ('UniPC', sd_samplers_timesteps_impl.unipc, ['unipc'], {})."""
    from fastapi.testclient import TestClient

    from sdlite.webui.server import create_app

    samplers = TestClient(create_app(tmp_path)).get("/sdapi/v1/samplers").json()
    assert {"name": "UniPC", "aliases": ["unipc"], "options": {}} in samplers
    assert [s["name"] for s in samplers].index("UniPC") == [s["name"] for s in samplers].index("PLMS") + 1
