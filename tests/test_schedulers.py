"""Tests for sdlite.schedulers: the schedule in closed form, the denoiser round trips, the name registry,
and full sampling loops of a deterministic dummy model against diffusers' schedulers (an independent
implementation), with the same starting noise and the same generator for the stochastic steps.

diffusers comes in through the ``diffusers`` fixture, so only the tests that compare against it skip where it
is not installed (CI installs it with the ``test`` extra); everything else runs without it.

Each named sigma schedule is pinned to a reference written here in another form than sdlite's code: the ldm
schedule in numpy (``LDM_SIGMAS``) with k-diffusion's t <-> sigma (``np.interp`` of log sigma), then the
definition of A1111's ``modules/sd_schedulers.py`` (ComfyUI's is the same for these): sgm_uniform, normal,
simple, kl_optimal (Sabour et al. 2024, sigma = tan of a linear ramp in arctan sigma) and Align Your Steps
(NVIDIA's published SD 1.5 list, geometrically interpolated). Where diffusers has the same schedule it is
compared too: ``timestep_spacing="linspace"`` at integral timesteps (normal, sgm_uniform), ``"trailing"`` for
n dividing 1000 (simple), ``AysSchedules`` (the AYS list). Tolerances: rtol 1e-12 against the float64
formulas, 1e-6 against diffusers' float32 sigmas.

Parity tolerance (fp32 state): max |ours - reference| <= 1e-5 * max |reference|.

How diffusers is configured to follow the originals (and where it cannot be made to):
- every scheduler: ``beta_schedule="scaled_linear"``, 0.00085 .. 0.012, T = 1000 (= ldm's "linear"); diffusers
  keeps alphabar in float32, whose rounding of 1 - alphabar_0 alone moves sigma_min by 3e-5 relative, so each
  reference scheduler is handed the float64 alphabar (checked against diffusers' own float32 values at 2e-6
  in ``test_diffusers_float32_alphabar_is_the_ldm_schedule_rounded``);
- k-samplers: ``timestep_spacing="linspace"``; the step counts are chosen so that linspace(999, 0, n) is
  integral (n = 10: multiples of 111; n = 28: of 37), because diffusers interpolates sigma *linearly* between
  integer timesteps while k-diffusion (and sdlite) interpolate *log* sigma; at integer t both are exact;
- DDIM / PLMS / DDPM: ``timestep_spacing="leading"``, ``steps_offset=1`` (= CompVis' range(0, T, T//n) + 1),
  ``set_alpha_to_one=False`` (CompVis' alphas_prev[0] = alphabar_0), ``clip_sample=False``;
- DPM-Solver++ (``DPMSolverMultistepScheduler``) works in VP space and starts from ``init_noise_sigma = 1``,
  whereas k-diffusion starts from x = sigma_max * noise, i.e. VP noise of std sigma_max / sqrt(1 + sigma_max^2)
  (0.9977); the reference run is started from that same state. With Karras or exponential sigmas diffusers
  hands the network *rounded/truncated* integer timesteps while k-diffusion (followed here) passes the
  fractional t = sigma_to_t(sigma); the reference run therefore calls the dummy model with diffusers' own
  unrounded ``_sigma_to_t`` — the update rule compared is diffusers', unchanged;
- LMS: diffusers integrates the Lagrange basis with ``scipy.integrate.quad``; the test gives that module
  a 10-point Gauss–Legendre ``quad`` instead (exact for these cubic polynomials) — an
  integration independent of sdlite's closed form;
- PLMS with a v model: diffusers' PNDM combines the raw v outputs of several steps and converts the
  combination to eps with the *current* x, whereas CompVis converts each step's v to eps first; the reference
  for v is therefore diffusers' PNDM run on the eps converted per step (what CompVis does);
- DPM++ 3M SDE: diffusers' third-order ``sde-dpmsolver++`` update uses a different D2 coefficient than
  k-diffusion, so only eta = 0 (the deterministic DPM-Solver++(3M), identical in both) is compared; its
  stochastic part is covered by the Gaussian-data distribution test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdlite.config import SD1
from sdlite.errors import ArgumentError, SamplerError
from sdlite.schedulers import (
    SAMPLERS,
    SCHEDULES,
    Denoiser,
    DiscreteSchedule,
    get_sampler,
    get_schedule_name,
    lms_coefficient,
    parse_sampler_and_schedule,
    schedule_label,
)

SCHED = DiscreteSchedule()
SHAPE = (2, 4, 8, 8)
DIFFUSERS_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-5

# The ldm "linear" schedule written out in float64 numpy, independently of sdlite: the reference for the schedules.
LDM_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # ldm make_beta_schedule("linear")
LDM_ALPHAS_CUMPROD = np.cumprod(1 - LDM_BETAS)
LDM_SIGMAS = np.sqrt((1 - LDM_ALPHAS_CUMPROD) / LDM_ALPHAS_CUMPROD)


@pytest.fixture(scope="module")
def diffusers():
    """diffusers, the independent implementation the parity tests compare against. A test extra: if it is
    missing, these tests fail rather than skip, so a broken install cannot pass as green."""
    import diffusers

    return diffusers


def _pattern() -> torch.Tensor:
    return torch.randn((1,) + SHAPE[1:], generator=torch.Generator().manual_seed(7), dtype=torch.float64)


PATTERN = _pattern()


def dummy_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A deterministic stand-in network: 0.1 x plus a pattern that varies smoothly with t (so a wrong t shows)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return (0.1 * x.double() + 0.3 * torch.sin(t / 97.0 + 3.0 * PATTERN)).to(x.dtype)


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert torch.isfinite(ours).all()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} * {scale:.3g}"


def exact_alphas(sched):
    """Give a diffusers scheduler the float64 alphabar (see the module docstring); before ``set_timesteps``."""
    sched.alphas_cumprod = SCHED.alphas_cumprod.clone()
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM/PNDM with set_alpha_to_one=False: alphabar_0
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    return sched


def run_diffusers(sched, x: torch.Tensor, *, model=dummy_model, generator=None, t_for_model=None) -> torch.Tensor:
    """The usual diffusers loop: scale_model_input → model → step."""
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        tt = torch.as_tensor(t if t_for_model is None else t_for_model(i), dtype=torch.float64).expand(x.shape[0])
        out = model(inp, tt)
        kw = {} if generator is None else {"generator": generator}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def ours(sampler: str, prediction: str, levels: torch.Tensor, noise: torch.Tensor, seed: int | None = None,
         eta: float | None = None, model=dummy_model) -> torch.Tensor:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return get_sampler(sampler).sample(Denoiser(model, SCHED, prediction), noise, levels, generator=gen, eta=eta)


def diffusers_prediction(prediction: str) -> str:
    return {"eps": "epsilon", "v": "v_prediction"}[prediction]


# -- the schedule -------------------------------------------------------------------------------------------

def test_schedule_betas_are_the_ldm_linear_schedule_in_float64():
    np.testing.assert_allclose(SCHED.betas.numpy(), LDM_BETAS, rtol=1e-15, atol=0)
    np.testing.assert_allclose(SCHED.alphas_cumprod.numpy(), LDM_ALPHAS_CUMPROD, rtol=1e-14)
    np.testing.assert_allclose(SCHED.sigmas.numpy(), LDM_SIGMAS, rtol=1e-13)
    assert SCHED.betas.dtype == torch.float64


def test_diffusers_float32_alphabar_is_the_ldm_schedule_rounded(diffusers):
    ref = diffusers.DDPMScheduler(**DIFFUSERS_BASE).alphas_cumprod  # float32 in diffusers
    np.testing.assert_allclose(SCHED.alphas_cumprod.numpy(), ref.double().numpy(), rtol=2e-6)


def test_schedule_from_config_uses_the_config_fields():
    s = DiscreteSchedule.from_config(SD1.with_(linear_start=0.001, linear_end=0.02, timesteps=500))
    assert s.num_timesteps == 500
    assert s.betas[0].item() == pytest.approx(0.001) and s.betas[-1].item() == pytest.approx(0.02)
    assert DiscreteSchedule.from_config(SD1).sigma_max == SCHED.sigma_max


def test_add_noise_is_ddpm_eq4_and_nearly_identity_at_t0():
    x0, noise = start_noise(1), start_noise(2)
    a0 = SCHED.alphas_cumprod[0].item()
    out = SCHED.add_noise(x0, noise, 0)
    # x_0 differs from the clean sample by exactly (sqrt(a0) - 1) x0 + sqrt(1 - a0) noise: a few percent.
    bound = (1 - math.sqrt(a0)) * x0.abs().max() + math.sqrt(1 - a0) * noise.abs().max()
    assert (out - x0).abs().max() <= bound + 1e-6
    assert math.sqrt(1 - a0) < 0.03
    t = torch.tensor([10, 990])
    a = torch.from_numpy(LDM_ALPHAS_CUMPROD[t.numpy()]).reshape(-1, 1, 1, 1)
    assert_parity(SCHED.add_noise(x0, noise, t), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double())
    with pytest.raises(ArgumentError):
        SCHED.add_noise(x0, noise, 1000)
    with pytest.raises(ArgumentError):
        SCHED.add_noise(x0, noise, torch.tensor(3.5))


def test_add_noise_matches_diffusers_ddpm(diffusers):
    x0, noise, t = start_noise(1), start_noise(2), torch.tensor([10, 990])
    ref = diffusers.DDPMScheduler(**DIFFUSERS_BASE).add_noise(x0, noise, t)
    assert_parity(SCHED.add_noise(x0, noise, t), ref)


def test_sigma_and_t_round_trip_with_log_sigma_interpolation():
    t = torch.tensor([0.0, 0.25, 1.5, 480.7, 998.99, 999.0], dtype=torch.float64)
    sig = SCHED.t_to_sigma(t)
    torch.testing.assert_close(SCHED.sigma_to_t(sig), t, rtol=0, atol=1e-9)
    # Integer t gives exactly the model's sigma; half-way is the geometric mean of the neighbours.
    assert SCHED.t_to_sigma(torch.tensor(37.0, dtype=torch.float64)).item() == SCHED.sigmas[37].item()
    mid = SCHED.t_to_sigma(torch.tensor(1.5, dtype=torch.float64)).item()
    assert mid == pytest.approx(math.sqrt(SCHED.sigmas[1].item() * SCHED.sigmas[2].item()), rel=1e-12)
    # Outside the range t clamps; sigma = 0 maps to t = 0 without NaN.
    assert SCHED.sigma_to_t(torch.tensor([0.0, 1e-4, 100.0])).tolist() == [0.0, 0.0, 999.0]


def test_automatic_sigmas_at_1000_steps_are_the_model_sigmas_reversed_then_zero():
    s = SCHED.get_sigmas(1000, "automatic", dtype=torch.float64)
    assert s.shape == (1001,) and s[-1].item() == 0.0
    torch.testing.assert_close(s[:-1], SCHED.sigmas.flip(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", [s.id for s in SCHEDULES])
def test_every_schedule_gives_n_plus_1_decreasing_sigmas_ending_in_zero(kind):
    for n in (1, 7, 10, 30):
        s = SCHED.get_sigmas(n, kind)
        # A1111's "ddim" schedule takes every (T // n)-th sigma, like CompVis' DDIM timesteps: 8 steps for n = 7.
        steps = len(SCHED.ddim_timesteps(n)) if kind == "ddim" else n
        assert s.shape == (steps + 1,) and s.dtype == torch.float32
        assert s[-1].item() == 0.0
        assert (s[:-1] > 0).all() and (s[1:] < s[:-1]).all(), (kind, n, s)


def test_karras_and_exponential_sigmas_follow_their_formulas():
    n, lo, hi = 10, SCHED.sigma_min, SCHED.sigma_max
    ramp = np.linspace(0, 1, n)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7  # Karras et al. 2022 eq. 5, rho = 7
    np.testing.assert_allclose(SCHED.get_sigmas(n, "karras", dtype=torch.float64)[:-1].numpy(), karras, rtol=1e-12)
    expo = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    np.testing.assert_allclose(SCHED.get_sigmas(n, "Exponential", dtype=torch.float64)[:-1].numpy(), expo, rtol=1e-12)
    # Polyexponential with rho = 1 is the exponential schedule.
    torch.testing.assert_close(SCHED.get_sigmas(n, "polyexponential"), SCHED.get_sigmas(n, "exponential"))
    # The DDIM schedule is the model's sigmas on DDIM's timesteps.
    torch.testing.assert_close(SCHED.get_sigmas(50, "ddim", dtype=torch.float64)[:-1],
                               SCHED.sigmas[SCHED.ddim_timesteps(50)])


# The named schedules against A1111's definitions (modules/sd_schedulers.py), written in numpy from LDM_SIGMAS.

SCHEDULE_STEPS = (1, 2, 3, 7, 10, 30)


def ref_t_to_sigma(t) -> np.ndarray:
    """k-diffusion's t -> sigma: log sigma linear between the neighbouring integer timesteps."""
    return np.exp(np.interp(t, np.arange(len(LDM_SIGMAS)), np.log(LDM_SIGMAS)))


def ref_sigma_to_t(sigma: float) -> float:
    """k-diffusion's sigma -> t (unquantised): t linear in log sigma; the model's range maps to [0, 999]."""
    return float(np.interp(math.log(sigma), np.log(LDM_SIGMAS), np.arange(len(LDM_SIGMAS))))


def sigmas64(n: int, kind: str, **kw) -> np.ndarray:
    return SCHED.get_sigmas(n, kind, dtype=torch.float64, **kw).numpy()


def test_sgm_uniform_is_sigma_at_n_plus_1_uniform_timesteps_without_the_last():
    """A1111 sgm_uniform: t = linspace(t(sigma_max), t(sigma_min), n + 1)[:-1] mapped to sigma, then 0 — so it
    starts at sigma_max (14.61) and stops one timestep interval above t = 0."""
    for n in SCHEDULE_STEPS:
        ref = np.append(ref_t_to_sigma(np.linspace(999, 0, n + 1)[:-1]), 0.0)
        np.testing.assert_allclose(sigmas64(n, "sgm_uniform"), ref, rtol=1e-12, atol=0, err_msg=f"n={n}")
    lo, hi = 0.1, 10.0  # a narrower range: the end timesteps are t(hi) and t(lo)
    ref = np.append(ref_t_to_sigma(np.linspace(ref_sigma_to_t(hi), ref_sigma_to_t(lo), 9)[:-1]), 0.0)
    np.testing.assert_allclose(sigmas64(8, "sgm_uniform", sigma_min=lo, sigma_max=hi), ref, rtol=1e-12, atol=0)


def test_normal_is_sigma_at_n_uniform_timesteps_from_sigma_max_to_sigma_min():
    """A1111 normal: t = linspace(t(sigma_max), t(sigma_min), n) mapped to sigma, then 0."""
    for n in SCHEDULE_STEPS:
        ref = np.append(ref_t_to_sigma(np.linspace(999, 0, n)), 0.0)
        np.testing.assert_allclose(sigmas64(n, "normal"), ref, rtol=1e-12, atol=0, err_msg=f"n={n}")
    lo, hi = 0.1, 10.0
    ref = np.append(ref_t_to_sigma(np.linspace(ref_sigma_to_t(hi), ref_sigma_to_t(lo), 8)), 0.0)
    np.testing.assert_allclose(sigmas64(8, "normal", sigma_min=lo, sigma_max=hi), ref, rtol=1e-12, atol=0)


def test_simple_takes_every_t_over_n_th_model_sigma_from_the_top():
    """A1111/ComfyUI simple: the model sigmas at t = 999 - floor(i * 1000 / n), i < n, then 0 (no interpolation).
    (For some n A1111's float i * (1000 / n) comes out just below an integer — n = 38, i = 19: 499.99... — and int()
    then picks the timestep above, t = 500 for 499; sdlite does the same. The step counts here avoid those.)"""
    for n in (*SCHEDULE_STEPS, 8, 37):
        t = 999 - (np.arange(n) * 1000) // n
        ref = np.append(LDM_SIGMAS[t], 0.0)
        np.testing.assert_allclose(sigmas64(n, "simple"), ref, rtol=1e-12, atol=0, err_msg=f"n={n}")


def test_kl_optimal_is_tan_of_a_uniform_ramp_in_arctan_sigma_ending_in_zero():
    """Sabour et al. 2024 (AYS), the KL-optimal schedule: sigma = tan(theta), theta uniform from arctan(sigma_max)
    to arctan(sigma_min) over n + 1 points; the last point (sigma_min) is replaced by 0 as ComfyUI does."""
    for n in SCHEDULE_STEPS:
        theta = np.linspace(np.arctan(LDM_SIGMAS[-1]), np.arctan(LDM_SIGMAS[0]), n + 1)
        ref = np.append(np.tan(theta[:-1]), 0.0)
        np.testing.assert_allclose(sigmas64(n, "kl_optimal"), ref, rtol=1e-12, atol=0, err_msg=f"n={n}")
    theta = np.linspace(np.arctan(10.0), np.arctan(0.1), 9)
    np.testing.assert_allclose(sigmas64(8, "kl_optimal", sigma_min=0.1, sigma_max=10.0),
                               np.append(np.tan(theta[:-1]), 0.0), rtol=1e-12, atol=0)


# NVIDIA's published Align Your Steps sigmas for SD 1.5 (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto),
# the 10-step schedule: 11 noise levels ending at sigma_min.
AYS_PUBLISHED_SD15 = np.array([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])


def test_align_your_steps_is_the_published_list_geometrically_interpolated_to_n_levels():
    """A1111: the 11 published levels, log-linearly resampled to n levels (n != 11), then 0. Log-linear
    between neighbours k and k + 1 at fraction f is the geometric mean s_k^(1-f) s_(k+1)^f; level i of n sits
    at position i (11 - 1) / (n - 1) along the list. At n = 11 the list itself comes out (A1111 appends 0 to it
    without resampling; so its 10-step run is a resampling, not the published 10-step schedule)."""
    pub = AYS_PUBLISHED_SD15
    for n in (2, 3, 7, 10, 11, 20, 30):
        pos = np.arange(n) * (len(pub) - 1) / (n - 1)
        k = np.minimum(np.floor(pos).astype(int), len(pub) - 2)
        f = pos - k
        ref = np.append(pub[k] ** (1 - f) * pub[k + 1] ** f, 0.0)
        np.testing.assert_allclose(sigmas64(n, "align_your_steps"), ref, rtol=1e-12, atol=0, err_msg=f"n={n}")
    np.testing.assert_array_equal(sigmas64(11, "align_your_steps"), np.append(pub, 0.0))


def test_align_your_steps_list_is_diffusers_ays_sd15_sigmas(diffusers):
    """diffusers' AysSchedules holds the same 10-step list with its last level (sigma_min = 0.029) set to 0."""
    ref = diffusers.schedulers.AysSchedules["StableDiffusionSigmas"]
    np.testing.assert_allclose(sigmas64(11, "align_your_steps")[:10], ref[:10], rtol=1e-12, atol=0)
    assert ref[10] == 0.0


def _euler_sigmas(diffusers, n: int, spacing: str) -> np.ndarray:
    sched = exact_alphas(diffusers.EulerDiscreteScheduler(**DIFFUSERS_BASE, timestep_spacing=spacing))
    sched.set_timesteps(n)
    return sched.sigmas.double().numpy()


def test_normal_and_sgm_uniform_match_diffusers_linspace_where_its_timesteps_are_integral(diffusers):
    """diffusers' "linspace" spacing is t = linspace(999, 0, n); it interpolates sigma linearly between integer
    timesteps where k-diffusion interpolates log sigma, so only n with (n - 1) | 999 are compared: normal is
    linspace at n, sgm_uniform is linspace at n + 1 without its last level."""
    for n in (4, 10, 28):
        np.testing.assert_allclose(sigmas64(n, "normal"), _euler_sigmas(diffusers, n, "linspace"), rtol=1e-6, atol=0,
                                   err_msg=f"n={n}")
    for n in (3, 9, 27):
        ref = _euler_sigmas(diffusers, n + 1, "linspace")
        np.testing.assert_allclose(sigmas64(n, "sgm_uniform"), np.append(ref[:n], 0.0), rtol=1e-6, atol=0,
                                   err_msg=f"n={n}")


def test_simple_matches_diffusers_trailing_spacing_when_n_divides_1000(diffusers):
    """diffusers' "trailing" spacing is t = round(1000 - i 1000 / n) - 1 at integer t: A1111's simple when n | 1000."""
    for n in (8, 10, 25, 50):
        np.testing.assert_allclose(sigmas64(n, "simple"), _euler_sigmas(diffusers, n, "trailing"), rtol=1e-6, atol=0,
                                   err_msg=f"n={n}")


def test_ddim_timesteps_are_compvis_uniform_plus_one():
    ts = SCHED.ddim_timesteps(50)
    assert ts.tolist() == list(range(981, 0, -20))
    assert ts.dtype == torch.int64
    assert SCHED.ddim_timesteps(7).tolist() == [995, 853, 711, 569, 427, 285, 143, 1]  # CompVis: 8 for n = 7
    assert SCHED.ddim_timesteps(1000)[0].item() == 999  # 1000 would be out of range; clipped as A1111 does
    with pytest.raises(ArgumentError):
        SCHED.ddim_timesteps(0)


def test_schedule_names_map_ids_labels_and_aliases():
    for s in SCHEDULES:
        for name in (s.id, s.label, s.label.upper(), *s.aliases):
            assert get_schedule_name(name) == s.id
        assert schedule_label(s.id) == s.label
    assert get_schedule_name(None) == "automatic"
    with pytest.raises(SamplerError, match="Karras"):
        get_schedule_name("karas")


# -- the denoiser -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_gives_back_x0_when_the_model_returns_the_exact_target(prediction):
    x0, eps = start_noise(3), start_noise(4)
    sigma = torch.tensor([0.7, 9.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_vp = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()       # the VP pair of this sigma
    target = eps.double() if prediction == "eps" else alpha * eps.double() - sigma_vp * x0.double()  # v = a eps - s x0

    def model(x_in, t):
        torch.testing.assert_close(x_in.double(), alpha * (x0.double() + s * eps.double()), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(SCHED.t_to_sigma(t.double()), sigma, rtol=1e-6, atol=0)  # t fractional, not rounded
        assert not torch.equal(t, t.round())
        return target.float()

    den = Denoiser(model, SCHED, prediction)
    torch.testing.assert_close(den(x0 + s.float() * eps, sigma.float()), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_eps_and_pred_x0_in_vp_space_invert_the_forward_process(prediction):
    x0, eps = start_noise(5), start_noise(6)
    t = torch.tensor([3, 870])
    a = SCHED.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = SCHED.add_noise(x0, eps, t)
    v = a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double()
    den = Denoiser(lambda x, tt: (eps if prediction == "eps" else v.float()), SCHED, prediction)
    e = den.eps(x_t, t)
    torch.testing.assert_close(e, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(den.pred_x0(x_t, t, e), x0, rtol=1e-4, atol=1e-4)


def test_denoiser_rejects_unknown_prediction_types():
    with pytest.raises(ArgumentError):
        Denoiser(dummy_model, SCHED, "sample")


# -- the registry -------------------------------------------------------------------------------------------

A1111_LABELS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM",
                "DDIM CFG++",
                "PLMS", "UniPC", "LCM", "DDPM"]


def test_sampler_list_is_in_a1111_order_with_a1111_labels():
    assert [s.label for s in SAMPLERS] == A1111_LABELS
    assert get_sampler("DPM++ 2M").default_schedule == "karras"
    assert get_sampler("DPM++ 2M SDE").default_schedule == "exponential"
    assert get_sampler("Euler a").default_schedule == "automatic"
    assert dict(get_sampler("DPM2").a1111_options)["discard_next_to_last_sigma"] is True


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.id)
def test_each_sampler_maps_id_label_and_aliases_both_ways(sampler):
    for name in sampler.names:
        assert get_sampler(name) is sampler
        assert get_sampler(name.upper()) is sampler
    assert sampler.id in sampler.names and sampler.label in sampler.names


def test_sampler_names_are_unique():
    names = [n for s in SAMPLERS for n in {name.lower() for name in s.names}]
    assert len(names) == len(set(names))


def test_unknown_sampler_raises_sampler_error_listing_the_valid_names():
    with pytest.raises(SamplerError) as info:
        get_sampler("Euler b")
    for label in ("Euler a", "DPM++ 2M", "DDIM", "PLMS"):
        assert label in str(info.value)
    with pytest.raises(SamplerError):
        get_sampler("")


def test_legacy_a1111_names_split_into_sampler_and_schedule():
    assert parse_sampler_and_schedule("DPM++ 2M Karras") == (get_sampler("dpmpp_2m"), "karras")
    assert parse_sampler_and_schedule("DPM++ 2M SDE Exponential") == (get_sampler("dpmpp_2m_sde"), "exponential")
    assert parse_sampler_and_schedule("LMS Karras") == (get_sampler("lms"), "karras")
    assert parse_sampler_and_schedule("DPM++ 2M SDE Heun") == (get_sampler("dpmpp_2m_sde_heun"), "automatic")
    assert parse_sampler_and_schedule("Euler a") == (get_sampler("euler_a"), "automatic")
    assert parse_sampler_and_schedule("euler", "SGM Uniform") == (get_sampler("euler"), "sgm_uniform")
    with pytest.raises(SamplerError):
        parse_sampler_and_schedule("Euler", "Karras-ish")


def test_levels_for_txt2img_img2img_and_discarded_penultimate_sigma():
    euler, ddim, dpm2 = get_sampler("euler"), get_sampler("ddim"), get_sampler("dpm2")
    full = euler.levels(SCHED, 20)
    torch.testing.assert_close(full, SCHED.get_sigmas(20))
    # img2img as A1111: t_enc = int(strength * steps); k: sigmas[steps - t_enc - 1:], DDIM: the last t_enc.
    torch.testing.assert_close(euler.levels(SCHED, 20, strength=0.5), full[9:])
    assert ddim.levels(SCHED, 20, strength=0.5).tolist() == SCHED.ddim_timesteps(20)[-10:].tolist()
    assert ddim.levels(SCHED, 20, "karras").tolist() == SCHED.ddim_timesteps(20).tolist()
    karras11 = SCHED.get_sigmas(11, "karras")
    torch.testing.assert_close(dpm2.levels(SCHED, 10), torch.cat([karras11[:-2], karras11[-1:]]))
    torch.testing.assert_close(get_sampler("DPM++ 2M").levels(SCHED, 10, "Automatic"), SCHED.get_sigmas(10, "karras"))
    with pytest.raises(ArgumentError):
        euler.levels(SCHED, 0)
    with pytest.raises(ArgumentError):
        euler.levels(SCHED, 10, strength=1.5)


# -- full loops against diffusers ------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,cls,stochastic", [
    ("euler", "EulerDiscreteScheduler", False),
    ("euler_a", "EulerAncestralDiscreteScheduler", True),
    ("heun", "HeunDiscreteScheduler", False),
    ("dpm2", "KDPM2DiscreteScheduler", False),
    ("dpm2_a", "KDPM2AncestralDiscreteScheduler", True),
])
def test_k_sampler_matches_diffusers(name, cls, stochastic, prediction, diffusers):
    n = 10  # linspace(999, 0, 10) = multiples of 111: integral timesteps
    sched = exact_alphas(getattr(diffusers, cls)(**DIFFUSERS_BASE, timestep_spacing="linspace",
                                                 prediction_type=diffusers_prediction(prediction)))
    sched.set_timesteps(n)
    levels = SCHED.get_sigmas(n, "uniform")
    # Heun/KDPM2 list each sigma twice (one entry per network call); the distinct values are the schedule.
    torch.testing.assert_close(torch.unique_consecutive(sched.sigmas), levels)
    noise = start_noise()
    gen = torch.Generator().manual_seed(123) if stochastic else None
    ref = run_diffusers(sched, noise * sched.init_noise_sigma, generator=gen)
    assert_parity(ours(name, prediction, levels, noise, seed=123 if stochastic else None), ref)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lms_matches_diffusers_with_independent_quadrature(prediction, monkeypatch, diffusers):
    from diffusers.schedulers import scheduling_lms_discrete  # the real class; diffusers.LMS... is a scipy stub

    nodes, weights = np.polynomial.legendre.leggauss(10)

    def quad(f, a, b, epsrel=None):  # Gauss–Legendre on [a, b]: exact for polynomials of degree < 20
        a, b = float(a), float(b)
        return (0.5 * (b - a) * sum(w * float(f(0.5 * (b - a) * x + 0.5 * (a + b))) for x, w in zip(nodes, weights)),
                0.0)

    monkeypatch.setattr(scheduling_lms_discrete, "integrate", SimpleNamespace(quad=quad), raising=False)
    n = 10
    sched = exact_alphas(scheduling_lms_discrete.LMSDiscreteScheduler(
        **DIFFUSERS_BASE, timestep_spacing="linspace", prediction_type=diffusers_prediction(prediction)))
    sched.set_timesteps(n)
    noise = start_noise()
    ref = run_diffusers(sched, noise * sched.init_noise_sigma)
    assert_parity(ours("lms", prediction, SCHED.get_sigmas(n, "uniform"), noise), ref)


def test_lms_coefficients_equal_numerical_integration_of_the_lagrange_basis():
    sig = SCHED.get_sigmas(12, "karras", dtype=torch.float64).tolist()
    nodes, weights = np.polynomial.legendre.leggauss(8)
    for i in range(3, 11):
        for j in range(4):
            def basis(tau):
                return np.prod([(tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(4) if k != j], axis=0)
            a, b = sig[i], sig[i + 1]
            ref = 0.5 * (b - a) * np.sum(weights * basis(0.5 * (b - a) * nodes + 0.5 * (a + b)))
            assert lms_coefficient(4, sig, i, j) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # The coefficients of a step sum to its length (the method is exact for constant derivatives).
    assert sum(lms_coefficient(4, sig, 5, j) for j in range(4)) == pytest.approx(sig[6] - sig[5], rel=1e-12)


def _dpmsolver(diffusers, n_or_timesteps, prediction, **config):
    sched = exact_alphas(diffusers.DPMSolverMultistepScheduler(
        **DIFFUSERS_BASE, prediction_type=diffusers_prediction(prediction), final_sigmas_type="zero", **config))
    if isinstance(n_or_timesteps, int):
        sched.set_timesteps(n_or_timesteps)
    else:
        sched.set_timesteps(timesteps=n_or_timesteps)
    return sched


def _vp_start(noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """k-diffusion's start x = sigma_max * noise, in diffusers' VP variable x / sqrt(1 + sigma_max^2)."""
    return noise * (sigma_max / math.sqrt(1 + sigma_max**2))


def _fractional_t(sched):
    log_sigmas = np.log(np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5))
    return lambda i: float(sched._sigma_to_t(np.array(sched.sigmas[i].item()), log_sigmas))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_on_the_model_schedule_matches_diffusers(prediction, diffusers):
    n = 10
    levels = SCHED.get_sigmas(n, "uniform")
    timesteps = [round(float(t)) for t in np.linspace(999, 0, n)]  # the same integral t's as get_sigmas(10)
    sched = _dpmsolver(diffusers, timesteps, prediction, algorithm_type="dpmsolver++", solver_order=2,
                       solver_type="midpoint")
    torch.testing.assert_close(sched.sigmas, levels)
    noise = start_noise()
    ref = run_diffusers(sched, _vp_start(noise, levels[0].item()))
    assert_parity(ours("dpmpp_2m", prediction, levels, noise), ref)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_karras_matches_diffusers_given_fractional_timesteps(prediction, diffusers):
    n = 10
    sched = _dpmsolver(diffusers, n, prediction, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    levels = get_sampler("DPM++ 2M").levels(SCHED, n)  # Automatic = Karras for DPM++ 2M
    torch.testing.assert_close(sched.sigmas, levels, rtol=1e-6, atol=0)
    noise = start_noise()
    ref = run_diffusers(sched, _vp_start(noise, sched.sigmas[0].item()), t_for_model=_fractional_t(sched))
    assert_parity(ours("dpmpp_2m", prediction, levels, noise), ref)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,solver_type", [("dpmpp_2m_sde", "midpoint"), ("dpmpp_2m_sde_heun", "heun")])
def test_dpmpp_2m_sde_exponential_matches_diffusers_sde_dpmsolver(name, solver_type, prediction, diffusers):
    n = 10
    sched = _dpmsolver(diffusers, n, prediction, algorithm_type="sde-dpmsolver++", solver_order=2,
                       solver_type=solver_type, use_exponential_sigmas=True)
    levels = get_sampler(name).levels(SCHED, n)  # Automatic = Exponential for the 2M SDE samplers
    torch.testing.assert_close(sched.sigmas, levels, rtol=1e-6, atol=0)
    noise = start_noise()
    ref = run_diffusers(sched, _vp_start(noise, sched.sigmas[0].item()), generator=torch.Generator().manual_seed(9),
                        t_for_model=_fractional_t(sched))
    assert_parity(ours(name, prediction, levels, noise, seed=9), ref)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_3m_sde_at_eta_0_matches_diffusers_dpmpp_3m(prediction, diffusers):
    n = 28  # >= 15 so that diffusers does not lower the order of the penultimate step; multiples of 37
    levels = SCHED.get_sigmas(n, "uniform")
    # k-diffusion's second step uses phi_2 = (e^-h - 1)/h + 1 on the first difference: diffusers' "heun" variant.
    sched = _dpmsolver(diffusers, [round(float(t)) for t in np.linspace(999, 0, n)], prediction,
                       algorithm_type="dpmsolver++", solver_order=3, solver_type="heun")
    noise = start_noise()
    ref = run_diffusers(sched, _vp_start(noise, levels[0].item()))
    assert_parity(ours("dpmpp_3m_sde", prediction, levels, noise, eta=0.0), ref)


def _timestep_scheduler(diffusers, cls: str, prediction: str, n: int, **config):
    sched = exact_alphas(getattr(diffusers, cls)(**DIFFUSERS_BASE, timestep_spacing="leading", steps_offset=1,
                                                 prediction_type=diffusers_prediction(prediction), **config))
    sched.set_timesteps(n)
    return sched


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_ddim(eta, prediction, diffusers):
    n = 50
    sched = _timestep_scheduler(diffusers, "DDIMScheduler", prediction, n, set_alpha_to_one=False, clip_sample=False)
    levels = get_sampler("DDIM").levels(SCHED, n)
    assert levels.tolist() == sched.timesteps.tolist()
    noise = start_noise()
    x = noise
    gen = torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t.expand(x.shape[0])), t, x, eta=eta, generator=gen).prev_sample
    assert_parity(ours("ddim", prediction, levels, noise, seed=5, eta=eta), x)


@pytest.mark.parametrize("start", [999.0, 601.0])  # txt2img; img2img from a kept DDIM timestep
def test_unipc_skip_types_space_the_grid_as_the_unipc_authors_get_time_steps(start):
    # In DPM-Solver's continuous time tau = t / 1000 + 1/1000, from tau_T to tau_0 = 1/1000 (then t = 0):
    # time_uniform: tau uniform; time_quadratic: sqrt(tau) uniform; logSNR: lambda = log(alpha / sigma) uniform.
    from sdlite.schedulers.unipc import log_alpha, unipc_time_grid

    def lam(t):
        la = log_alpha(SCHED, t)
        return la - 0.5 * math.log(-math.expm1(2 * la))

    n = 8
    for skip_type, f in (("time_uniform", lambda t: t / 1000 + 1e-3),
                         ("time_quadratic", lambda t: math.sqrt(t / 1000 + 1e-3)), ("logSNR", lam)):
        grid = unipc_time_grid(SCHED, start, n, skip_type).tolist()
        assert len(grid) == n and grid[0] == pytest.approx(start) and grid == sorted(grid, reverse=True), skip_type
        gaps = [f(a) - f(b) for a, b in zip(grid, grid[1:] + [0.0])]
        assert max(gaps) - min(gaps) < 1e-6 * max(abs(g) for g in gaps), (skip_type, gaps)
    assert get_sampler("UniPC").levels(SCHED, n, settings={"uni_pc_skip_type": "logSNR"}).tolist() == \
        unipc_time_grid(SCHED, 999.0, n, "logSNR").tolist()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_cfgpp_predicts_x0_from_the_guided_noise_and_steps_back_along_the_unconditional_one(prediction):
    # CFG++ (Chung et al. 2024), eta = 0: x_prev = sqrt(a_prev) (x - sqrt(1 - a_t) e_g) / sqrt(a_t)
    # + sqrt(1 - a_prev) e_u, with each network output turned into noise first (v: sqrt(a) v + sqrt(1 - a) x).
    def guided(x, t):
        return 0.1 * x + 0.01 * t.reshape(-1, 1, 1, 1) / 1000

    def uncond(x, t):
        return -0.2 * x + 0.3

    model = lambda x, t: guided(x, t)  # noqa: E731
    model.with_uncond = lambda x, t: (guided(x, t), uncond(x, t))
    den = Denoiser(model, SCHED, prediction)
    levels = get_sampler("DDIM CFG++").levels(SCHED, 3)
    noise = start_noise()
    ac = SCHED.alphas_cumprod.double()
    ts = levels.tolist()
    x = noise.double()
    for i, t in enumerate(ts):
        a_t, a_prev = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else ac[0])
        tt = torch.tensor([float(t)], dtype=torch.float64)
        e_g, e_u = guided(x, tt), uncond(x, tt)
        if prediction == "v":
            e_g, e_u = (a_t.sqrt() * e + (1 - a_t).sqrt() * x for e in (e_g, e_u))
        x0 = (x - (1 - a_t).sqrt() * e_g) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e_u
    out = get_sampler("ddim_cfgpp").sample(den, noise, levels)
    torch.testing.assert_close(out, x.float(), rtol=1e-4, atol=1e-4)
    plain = Denoiser(lambda x, t: guided(x, t), SCHED, prediction)  # no guidance: CFG++ is DDIM
    torch.testing.assert_close(get_sampler("ddim_cfgpp").sample(plain, noise, levels),
                               get_sampler("ddim").sample(plain, noise, levels), rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_plms_matches_diffusers_pndm_with_skipped_prk_steps(prediction, diffusers):
    n = 20
    sched = _timestep_scheduler(diffusers, "PNDMScheduler", "eps", n, skip_prk_steps=True, set_alpha_to_one=False)
    levels = get_sampler("PLMS").levels(SCHED, n)
    ac = sched.alphas_cumprod.double()

    def eps_model(x, t):  # CompVis converts each call's v to eps before the multistep combination
        out = dummy_model(x, t)
        if prediction == "eps":
            return out
        a = ac[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1)
        return (a.sqrt() * out.double() + (1 - a).sqrt() * x.double()).float()

    noise = start_noise()
    # diffusers repeats the second timestep (981, 961, 961, 941, ...): n + 1 calls, as CompVis' warm-up.
    assert sched.timesteps.tolist()[:3] == [levels[0].item(), levels[1].item(), levels[1].item()]
    ref = run_diffusers(sched, noise, model=eps_model)
    assert_parity(ours("plms", prediction, levels, noise), ref)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_matches_diffusers_ddpm_on_strided_timesteps(prediction, diffusers):
    n = 50
    sched = _timestep_scheduler(diffusers, "DDPMScheduler", prediction, n, clip_sample=False,
                                variance_type="fixed_small")
    noise = start_noise()
    ref = run_diffusers(sched, noise, generator=torch.Generator().manual_seed(11))
    # diffusers adds noise of std 1e-10 (the clamped zero variance) at the last step; sdlite none, as the original.
    assert_parity(ours("ddpm", prediction, get_sampler("DDPM").levels(SCHED, n), noise, seed=11), ref)


# -- behaviour --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", [("euler_a", "euler"), ("dpm2_a", "dpm2"), ("dpmpp_2m_sde", "dpmpp_2m"),
                                  ("dpmpp_sde", "dpmpp_2s_a")])
def test_stochastic_samplers_at_eta_0_reduce_to_their_ode_solver(pair):
    noisy, ode = pair
    levels = SCHED.get_sigmas(12, "karras")
    noise = start_noise()
    a = ours(noisy, "eps", levels, noise, seed=1, eta=0.0)
    b = ours(ode, "eps", levels, noise, seed=2, eta=0.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_seeded_generator_makes_stochastic_samplers_deterministic_and_seed_dependent():
    levels = SCHED.get_sigmas(8)
    noise = start_noise()
    a, b = ours("euler_a", "eps", levels, noise, seed=3), ours("euler_a", "eps", levels, noise, seed=3)
    c = ours("euler_a", "eps", levels, noise, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if not s.endpoints_only], ids=lambda s: s.id)
def test_callback_sees_every_step_and_false_stops_sampling(sampler):
    """(DPM fast / DPM adaptive choose their own steps between the ends of the levels: tests/test_dpm_solver.py.)"""
    den = Denoiser(dummy_model, SCHED, "eps")
    levels = sampler.levels(SCHED, 6)
    n = len(levels) - 1 if sampler.family == "k" else len(levels)
    seen = []
    sampler.sample(den, start_noise(), levels, generator=torch.Generator().manual_seed(0),
                   callback=lambda i, level, x, d: seen.append((i, float(level))))
    assert [i for i, _ in seen] == list(range(n))
    assert [lv for _, lv in seen] == pytest.approx([float(v) for v in levels[:n]])
    last = {}

    def stop(i, level, x, denoised):
        last["x"] = x
        return False

    out = sampler.sample(den, start_noise(), levels, generator=torch.Generator().manual_seed(0), callback=stop)
    assert torch.equal(out, last["x"])



@pytest.mark.parametrize("eta", [1.5, 3.0])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s.uses_eta and s.max_eta > 1], ids=lambda s: s.id)
def test_k_samplers_take_eta_above_1_and_stay_finite(sampler, eta):
    """eta > 1 (A1111's API takes any eta) clips an ancestral step's sigma_up to sigma_next on large steps,
    so sigma_down is 0 and -log sigma_down infinite: the run must still end, finite, as k-diffusion's does."""
    den = Denoiser(gaussian_data_model(1.0), SCHED, "eps")
    out = sampler.sample(den, start_noise(), sampler.levels(SCHED, 10), generator=torch.Generator().manual_seed(0),
                         eta=eta)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler, noise_std", [("euler_a", 5.0), ("dpmpp_2s_a", 5.0), ("dpmpp_sde", 5.0),
                                                ("dpm2_a", 0.0)])
def test_an_ancestral_step_with_sigma_down_0_lands_on_the_denoised_and_adds_all_of_sigma_next(sampler, noise_std):
    """From sigma 10 to 5 at eta = 2, sigma_up is clipped to 5 and sigma_down is 0: with data 0 and the exact
    denoiser, the step lands on 0 and adds noise of std 5. DPM2 a, as k-diffusion's (A1111's images), adds none
    after its Euler branch."""
    den = Denoiser(gaussian_data_model(0.0), SCHED, "eps")
    after = {}

    def first_step(i, level, x, denoised):
        after["x"] = x
        return False

    noise = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    get_sampler(sampler).sample(den, noise, torch.tensor([10.0, 5.0, 0.0]), generator=torch.Generator().manual_seed(1),
                                eta=2.0, callback=first_step)
    assert after["x"].std().item() == pytest.approx(noise_std, rel=0.05, abs=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddim_cfgpp"])
def test_ddim_rejects_eta_above_1_where_its_noise_would_exceed_the_step(sampler):
    """Eq. 16's sigma_t = eta x the DDPM posterior std: past eta = 1 it exceeds sqrt(1 - a_prev), the direction
    term's square root goes negative (NaN in CompVis' and A1111's DDIM). 1 itself is the DDPM posterior."""
    spec = get_sampler(sampler)
    assert spec.uses_eta and sampler in {s.id for s in SAMPLERS if s.max_eta == 1.0}
    with pytest.raises(ArgumentError, match="≤ 1"):
        ours(sampler, "eps", spec.levels(SCHED, 5), start_noise(), eta=1.01)
    assert torch.isfinite(ours(sampler, "eps", spec.levels(SCHED, 5), start_noise(), seed=0, eta=1.0)).all()


def test_dpmpp_sde_draws_its_two_noises_as_nested_brownian_increments():
    """DPM++ SDE adds noise twice in a step: over [sigma_s, sigma] to reach the midpoint, and over
    [sigma_next, sigma] for the whole step. As k-diffusion's Brownian tree makes them, they are increments
    of one Brownian motion in sigma, so the unit noises correlate by sqrt((sigma - sigma_s) / (sigma -
    sigma_next)). With a denoiser that returns 0 each noise is read back from the sampler's own states."""
    from sdlite.schedulers.k_samplers import get_ancestral_step

    sigma, sigma_next = 10.0, 5.0
    sigma_s = math.sqrt(sigma * sigma_next)  # the midpoint in log sigma (r = 1/2)
    inputs = []

    def zero_x0(x_in, t):  # eps = x / sigma: the denoised estimate is 0
        s = SCHED.t_to_sigma(t.double()).reshape(-1, 1, 1, 1)
        x = x_in.double() * (s**2 + 1).sqrt()
        inputs.append((float(s.flatten()[0]), x))
        return (x / s).float()

    after = {}

    def first_step(i, level, x, denoised):
        after["x"] = x.double()
        return False

    x0 = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    get_sampler("dpmpp_sde").sample(Denoiser(zero_x0, SCHED, "eps"), x0, torch.tensor([sigma, sigma_next, 0.0]),
                                    generator=torch.Generator().manual_seed(1), callback=first_step)
    (s_1, x), (s_2, x_2) = inputs[:2]
    assert s_1 == pytest.approx(sigma) and s_2 == pytest.approx(sigma_s, rel=1e-4)
    down_1, up_1 = get_ancestral_step(sigma, sigma_s)
    down_2, up_2 = get_ancestral_step(sigma, sigma_next)
    z_1 = (x_2 - down_1 / sigma * x) / up_1
    z_2 = (after["x"] - down_2 / sigma * x) / up_2
    assert z_1.std().item() == pytest.approx(1, abs=0.03) and z_2.std().item() == pytest.approx(1, abs=0.03)
    corr = torch.corrcoef(torch.stack([z_1.flatten(), z_2.flatten()]))[0, 1].item()
    # 0.765 here; the two noises swapped would give 0.643, independent ones 0 (16384 samples: s.e. ~0.005)
    assert corr == pytest.approx(math.sqrt((sigma - sigma_s) / (sigma - sigma_next)), abs=0.02)


def test_plms_ignores_eta_as_a1111_does():
    levels = SCHED.ddim_timesteps(5)
    assert torch.equal(ours("plms", "eps", levels, start_noise(), eta=1.0), ours("plms", "eps", levels, start_noise()))


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if not s.stochastic], ids=lambda s: s.id)
def test_img2img_with_an_oracle_model_returns_the_init(sampler):
    """A model that predicts exactly the noise that was added: every deterministic sampler must then walk
    the straight line back to the init — which proves the init is noised to the level the run starts at."""
    init, noise = start_noise(8), start_noise(9)
    den = Denoiser(lambda x, t: noise, SCHED, "eps")
    levels = sampler.levels(SCHED, 10, strength=0.6)
    out = sampler.sample(den, noise, levels, init=init)
    expected = init if sampler.family == "k" else SCHED.add_noise(init, noise, 0)  # DDIM/PLMS end at t = 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def gaussian_data_model(s: float):
    """The exact eps-prediction for data x0 ~ N(0, s^2): E[eps | x] = x_k sigma / (s^2 + sigma^2) with
    x_k = x_in sqrt(1 + sigma^2) — valid for both the sigma-space and the VP-space samplers."""
    def model(x_in, t):
        sigma = SCHED.t_to_sigma(t.double()).reshape(-1, 1, 1, 1).to(x_in.device)
        x_k = x_in.double() * (1 + sigma**2).sqrt()
        return (x_k * sigma / (s**2 + sigma**2)).float()
    return model


FIRST_ORDER = {"euler", "euler_a", "ddim", "ddim_cfgpp", "ddpm"}  # their bias shrinks only like 1/steps


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.id)
def test_sampler_maps_noise_to_gaussian_data_of_the_right_scale(sampler):
    """For data N(0, s^2) with the exact denoiser, the final latent must have std s, within 4 % (16384
    samples; the samplers' discretisation bias at 30 steps, 500 for the first-order ones — with independent
    instead of Brownian noises DPM++ SDE is 9 % off here). The deterministic samplers must moreover follow
    the exact probability-flow map, in sigma space x(sigma) = x(sigma_0) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2),
    to 1 % of the largest value; so must the stochastic k samplers at eta = 0 (DPM fast and DPM adaptive end at
    sigma_min; DPM adaptive is held to its default rtol, 5 %: measured 2.8 %)."""
    if sampler.id == "lcm":
        pytest.skip("LCM's steps need a consistency function, not a denoiser: tests/test_lcm_restart.py tests it")
    s = 1.0
    den = Denoiser(gaussian_data_model(s), SCHED, "eps")
    noise = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    levels = sampler.levels(SCHED, 500 if sampler.id in FIRST_ORDER else 30)
    out = sampler.sample(den, noise, levels, generator=torch.Generator().manual_seed(1))
    assert out.std().item() == pytest.approx(s, rel=0.04), sampler.id
    if sampler.id in ("ddpm", "lcm", "restart"):  # no deterministic member (their noise does not scale with eta)
        return
    if sampler.stochastic:
        out = sampler.sample(den, noise, levels, eta=0.0)
    if sampler.family == "k":  # from x = sigma_0 noise to sigma = 0
        sigma_0 = levels[0].item()
        sigma_end = SCHED.sigma_min if sampler.endpoints_only else 0.0
        exact = noise * sigma_0 * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_0**2)
    else:  # VP: from x_t = noise at t_0 to x at t = 0 (x_k = x_vp sqrt(1 + sigma^2))
        sigma_0, sigma_end = SCHED.sigmas[int(levels[0])].item(), SCHED.sigma_min
        exact = (noise * math.sqrt(1 + sigma_0**2) * math.sqrt(s**2 + sigma_end**2) / math.sqrt(s**2 + sigma_0**2)
                 / math.sqrt(1 + sigma_end**2))
    tol = 0.05 if sampler.id == "dpm_adaptive" else 0.01
    assert (out - exact).abs().max().item() < tol * exact.abs().max().item()


@pytest.mark.parametrize("steps", [1, 7, 20])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.id)
def test_step_count_is_the_number_of_callbacks_a_run_makes(sampler, steps):
    # The progress bar's total (pipeline and web UI): DPM fast makes floor(n / 3) + 1 steps, DPM adaptive
    # chooses its own (None), every other sampler one per level.
    den = Denoiser(gaussian_data_model(1.0), SCHED, "eps")
    levels = sampler.levels(SCHED, steps)
    seen = []
    sampler.sample(den, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)), levels,
                   generator=torch.Generator().manual_seed(1), callback=lambda i, *_: seen.append(i))
    expected = sampler.step_count(levels)
    if sampler.id == "dpm_adaptive":
        assert expected is None and seen
    else:
        assert len(seen) == expected, (sampler.id, len(seen), expected)
        if sampler.id == "dpm_fast":
            assert expected == steps // 3 + 1


def test_progress_bar_without_a_total_counts_steps_and_time():
    import io

    from sdlite.progress import ProgressBar

    out = io.StringIO()
    with ProgressBar(None, "sampling", stream=out) as bar:
        for _ in range(3):
            bar.update(1)
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("sampling 3 [") and "/" not in last and "<" not in last
