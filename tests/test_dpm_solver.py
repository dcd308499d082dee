"""DPM fast and DPM adaptive (sdlite.schedulers.dpm_solver): DPM-Solver, Lu et al. 2022 (arXiv:2206.00927).

- The steps and DPM-Solver-fast are compared with a reference written here from the paper in its own notation,
  the VP form (x_t = alpha_t x_0 + sigma_t eps, lambda = log(alpha_t / sigma_t), Algorithms 1 and 2, section 3.4),
  in float64 on a nonlinear toy denoiser; sdlite works in sigma space (x = x_VP / alpha, t = lambda = -log sigma).
  Tolerance: 1e-10 relative (measured about 1e-15).
- On Gaussian data x0 ~ N(0, s^2) the denoiser is exact, D(x, sigma) = x s^2 / (s^2 + sigma^2), and so is the
  probability-flow ODE's solution x(sigma) = x_T sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2): the orders of
  convergence and the adaptive solver's tolerance are measured against it.
- The registry: A1111's ends (sigma_max, sigma_min, n), and the pipeline on the tiny random model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlite import devices
from sdlite.clip import tokenizer_for
from sdlite.pipeline import Pipeline
from sdlite.schedulers import DiscreteSchedule, get_sampler
from sdlite.schedulers.dpm_solver import (
    PIDStepSizeController,
    dpm_solver_1_step,
    dpm_solver_2_step,
    dpm_solver_3_step,
    dpm_solver_adaptive,
    dpm_solver_fast,
    endpoints,
    fast_orders,
)

from factory import TINY_SD1, random_networks

SCHED = DiscreteSchedule()
SIGMA_MAX, SIGMA_MIN = SCHED.sigma_max, SCHED.sigma_min


# -- a toy denoiser and the paper's algorithms in VP notation ------------------------------------------------------

class Toy:
    """A smooth nonlinear x0 estimate (so every term of the steps matters); ``calls`` counts network calls."""

    schedule = SCHED

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        sigma = float(sigma)
        return 0.8 * torch.tanh(x) / (1 + 0.3 * sigma) + 0.1 * torch.sin(x + sigma)


def alpha(lam: float) -> float:
    """VP alpha at log-SNR/2 lambda: alpha^2 + sigma_VP^2 = 1, alpha / sigma_VP = e^lambda."""
    return 1 / math.sqrt(1 + math.exp(-2 * lam))


def sigma_vp(lam: float) -> float:
    return alpha(lam) * math.exp(-lam)


def eps_vp(den, x_vp: torch.Tensor, lam: float) -> torch.Tensor:
    """The noise prediction of the VP model that has the same x0 estimate as ``den``."""
    x0 = den(x_vp / alpha(lam), math.exp(-lam))
    return (x_vp - alpha(lam) * x0) / sigma_vp(lam)


def paper_step(den, x: torch.Tensor, lam_s: float, lam_t: float, order: int) -> torch.Tensor:
    """DPM-Solver-1 (eq. 3.7), -2 (Algorithm 1, r1 = 1/2), -3 (Algorithm 2, r1 = 1/3, r2 = 2/3) in VP form."""
    h = lam_t - lam_s
    a, e = alpha, math.expm1
    eps = eps_vp(den, x, lam_s)
    if order == 1:
        return a(lam_t) / a(lam_s) * x - sigma_vp(lam_t) * e(h) * eps
    if order == 2:
        r1 = 0.5
        s1 = lam_s + r1 * h
        u1 = a(s1) / a(lam_s) * x - sigma_vp(s1) * e(r1 * h) * eps
        return (a(lam_t) / a(lam_s) * x - sigma_vp(lam_t) * e(h) * eps
                - sigma_vp(lam_t) / (2 * r1) * e(h) * (eps_vp(den, u1, s1) - eps))
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = lam_s + r1 * h, lam_s + r2 * h
    u1 = a(s1) / a(lam_s) * x - sigma_vp(s1) * e(r1 * h) * eps
    d1 = eps_vp(den, u1, s1) - eps
    u2 = (a(s2) / a(lam_s) * x - sigma_vp(s2) * e(r2 * h) * eps
          - sigma_vp(s2) * r2 / r1 * (e(r2 * h) / (r2 * h) - 1) * d1)
    d2 = eps_vp(den, u2, s2) - eps
    return a(lam_t) / a(lam_s) * x - sigma_vp(lam_t) * e(h) * eps - sigma_vp(lam_t) / r2 * (e(h) / h - 1) * d2


def paper_fast(den, x_vp: torch.Tensor, lam_T: float, lam_eps: float, nfe: int) -> torch.Tensor:
    """DPM-Solver-fast as section 3.4 words it: K = floor(nfe / 3) + 1 steps uniform in lambda; nfe = 3k:
    K - 2 DPM-Solver-3, one -2, one -1; nfe = 3k + 1: K - 1 DPM-Solver-3, one -1; nfe = 3k + 2: K - 1
    DPM-Solver-3, one -2."""
    k = nfe // 3
    orders = {0: [3] * (k - 1) + [2, 1], 1: [3] * k + [1], 2: [3] * k + [2]}[nfe % 3]
    lams = np.linspace(lam_T, lam_eps, len(orders) + 1)
    for i, order in enumerate(orders):
        x_vp = paper_step(den, x_vp, float(lams[i]), float(lams[i + 1]), order)
    return x_vp


def start(seed: int = 0, shape=(2, 3, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_each_step_is_the_papers_algorithm_written_in_vp_notation(order):
    den, x = Toy(), start() * 2.0
    lam_s, lam_t = -math.log(2.0), -math.log(2.0) + 0.7  # sigma 2 → 2 e^-0.7
    eps = (x - den(x, math.exp(-lam_s))) / math.exp(-lam_s)
    if order == 1:
        ours = dpm_solver_1_step(x, lam_s, lam_t, eps)
    elif order == 2:
        ours, _ = dpm_solver_2_step(den, x, lam_s, lam_t, eps)
    else:
        ours = dpm_solver_3_step(den, x, lam_s, lam_t, eps)
    ref = paper_step(den, x * alpha(lam_s), lam_s, lam_t, order) / alpha(lam_t)
    assert rel_err(ours, ref) < 1e-12


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 10, 11, 12])
def test_dpm_fast_is_the_papers_dpm_solver_fast_and_calls_the_network_exactly_nfe_times(nfe):
    den = Toy()
    x = start() * SIGMA_MAX
    ours = dpm_solver_fast(den, x, SIGMA_MIN, SIGMA_MAX, nfe)
    assert den.calls == nfe
    lam_T, lam_eps = -math.log(SIGMA_MAX), -math.log(SIGMA_MIN)
    ref = paper_fast(Toy(), x * alpha(lam_T), lam_T, lam_eps, nfe) / alpha(lam_eps)
    assert rel_err(ours, ref) < 1e-10


def test_fast_orders_put_the_remainder_of_nfe_over_3_at_the_end():
    assert fast_orders(1) == [1] and fast_orders(2) == [2] and fast_orders(3) == [2, 1]
    assert fast_orders(20) == [3] * 6 + [2] and fast_orders(19) == [3] * 6 + [1]
    assert all(sum(fast_orders(n)) == n and len(fast_orders(n)) == n // 3 + 1 for n in range(1, 60))


# -- convergence on Gaussian data -----------------------------------------------------------------------------

S2 = 0.5 ** 2  # data variance


class Gaussian:
    """The exact denoiser of x0 ~ N(0, S2): E[x0 | x0 + sigma z = x] = x S2 / (S2 + sigma^2)."""

    schedule = SCHED

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * S2 / (S2 + float(sigma) ** 2)


def exact(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return x * math.sqrt(S2 + sigma_to ** 2) / math.sqrt(S2 + sigma_from ** 2)


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def test_steps_of_order_k_have_local_error_of_order_k_plus_1():
    """Measured slopes of log error vs log h (h = 0.4 .. 0.05 from sigma = 1): 1.96, 3.00, 4.08."""
    den, x = Gaussian(), torch.ones(1, dtype=torch.float64)
    hs = [0.4, 0.2, 0.1, 0.05]
    for order in (1, 2, 3):
        errs = []
        for h in hs:
            eps = x - den(x, 1.0)
            if order == 1:
                y = dpm_solver_1_step(x, 0.0, h, eps)
            elif order == 2:
                y, _ = dpm_solver_2_step(den, x, 0.0, h, eps)
            else:
                y = dpm_solver_3_step(den, x, 0.0, h, eps)
            errs.append(abs((y - exact(x, 1.0, math.exp(-h))).item()))
        assert abs(slope(hs, errs) - (order + 1)) < 0.2, (order, errs)


def test_dpm_fast_error_falls_as_steps_to_the_minus_3():
    """nfe = 3k + 2: every step third order but the last, second order (local error O(h^3)), so the global error
    is O(h^3), h ∝ 1 / nfe. Measured: max errors 1.6e-2, 1.8e-3, 2.0e-4, 2.4e-5 at nfe 14, 26, 50, 98: slope -3.34."""
    x = start(1) * SIGMA_MAX
    nfes = [14, 26, 50, 98]
    errs = [(dpm_solver_fast(Gaussian(), x, SIGMA_MIN, SIGMA_MAX, n) - exact(x, SIGMA_MAX, SIGMA_MIN)).abs().max().item()
            for n in nfes]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert -3.6 < slope(nfes, errs) < -2.7, errs


def test_dpm_adaptive_meets_its_tolerance_and_takes_more_steps_for_a_smaller_rtol():
    """rtol bounds the *local* error estimate |x_low - x_high|; the global error at sigma_min stays within
    3 rtol max |x| (atol 1e-6 so that rtol governs). Measured for rtol 0.05 (the default), 0.01, 1e-3, 1e-4:
    steps 9, 11, 16, 27; max error 2.7e-2, 2.4e-2, 2.6e-3, 1.5e-4 = 0.50, 2.23, 2.35, 1.34 rtol max |x|."""
    x = start(2) * SIGMA_MAX
    ref = exact(x, SIGMA_MAX, SIGMA_MIN)
    steps, errs = [], []
    for rtol in (0.05, 0.01, 1e-3, 1e-4):
        info = {}
        out = dpm_solver_adaptive(Gaussian(), x, SIGMA_MIN, SIGMA_MAX, rtol=rtol, atol=1e-6, info=info)
        err = (out - ref).abs().max().item()
        assert err <= 3 * rtol * ref.abs().max().item(), (rtol, err)
        assert info["nfe"] == 3 * info["steps"] == 3 * (info["n_accept"] + info["n_reject"])
        steps.append(info["steps"])
        errs.append(err)
    assert steps == sorted(set(steps)), steps  # strictly more steps for each smaller rtol
    assert errs[-1] < errs[0] / 100


def test_pid_controller_with_the_default_coefficients_scales_h_by_1_plus_atan_of_err_to_the_minus_1_over_k_minus_1():
    pid = PIDStepSizeController(0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, order=3, accept_safety=0.81)
    assert pid.propose_step(0.1)  # small error: accepted, h grows
    factor = 1 + math.atan((1 / (0.1 + 1e-8)) ** (1 / 3) - 1)
    assert pid.h == pytest.approx(0.05 * factor, rel=1e-12)
    h = pid.h
    assert not pid.propose_step(20.0)  # factor 1 + atan(20^(-1/3) - 1) = 0.50 < 0.81: rejected, h shrinks
    assert pid.h == pytest.approx(h * (1 + math.atan(20.0 ** (-1 / 3) - 1)), rel=1e-9)


@pytest.mark.parametrize("which", ["fast", "adaptive"])
def test_eta_1_samples_gaussian_data_with_the_variance_of_data_plus_sigma_min_noise(which):
    """The ancestral steps keep the marginals: at sigma_min, x ~ N(0, s^2 + sigma_min^2) (40,000 samples; measured
    std 0.5004 for DPM fast with 30 calls, 0.5009 for DPM adaptive at its defaults, target 0.5009). eta = 0 is the
    deterministic ODE solver, which the noise changes."""
    x = torch.randn(1, 1, 200, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * \
        math.sqrt(S2 + SIGMA_MAX ** 2)

    def run(eta, seed):
        gen = torch.Generator().manual_seed(seed)
        if which == "fast":
            return dpm_solver_fast(Gaussian(), x, SIGMA_MIN, SIGMA_MAX, 30, eta=eta, generator=gen)
        return dpm_solver_adaptive(Gaussian(), x, SIGMA_MIN, SIGMA_MAX, eta=eta, generator=gen)

    out = run(1.0, 4)
    assert out.std().item() == pytest.approx(math.sqrt(S2 + SIGMA_MIN ** 2), rel=0.01)
    assert torch.equal(run(0.0, 4), run(0.0, 5))
    assert (out - run(0.0, 4)).abs().max().item() > 0.1


# -- callbacks -------------------------------------------------------------------------------------------------------

def test_dpm_fast_calls_back_after_each_of_its_steps_at_the_step_start_and_false_stops():
    seen = []
    dpm_solver_fast(Toy(), start() * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, 10,
                    callback=lambda i, sigma, x, d: seen.append((i, sigma)))
    grid = np.exp(-np.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 5))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert [s for _, s in seen] == pytest.approx(grid[:4].tolist(), rel=1e-12)
    last = {}

    def stop(i, sigma, x, denoised):
        last["x"], last["calls"] = x, i
        return False if i == 1 else None

    den = Toy()
    out = dpm_solver_fast(den, start() * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, 10, callback=stop)
    assert torch.equal(out, last["x"]) and last["calls"] == 1 and den.calls == 6


def test_dpm_adaptive_calls_back_after_every_try_and_false_stops():
    info, seen = {}, []
    dpm_solver_adaptive(Toy(), start() * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, info=info,
                        callback=lambda i, sigma, x, d: seen.append(i))
    assert seen == list(range(info["steps"])) and info["n_accept"] > 1
    den = Toy()
    out = dpm_solver_adaptive(den, start() * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, callback=lambda *a: False)
    assert den.calls == 3 and out.shape == (2, 3, 4, 4)


def test_dpm_adaptive_stops_with_an_error_on_a_nan_latent_instead_of_trying_forever():
    """A NaN error accepts no step size, and the loop never ended (an API request with cfg_scale 1e30 held
    the web UI's one worker for good)."""
    calls = []

    def broken(x, sigma):
        calls.append(1)
        if len(calls) > 500:
            raise AssertionError("still trying after 500 network calls")
        return torch.full_like(x, float("nan"))

    broken.schedule = SCHED
    from sdlite.errors import GenerationError

    with pytest.raises(GenerationError, match="NaN or infinite"):
        dpm_solver_adaptive(broken, start() * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX)
    assert len(calls) <= 3


# -- the registry: what A1111 passes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_txt2img_runs_between_the_model_sigma_max_and_sigma_min_with_n_steps_whatever_the_schedule(name):
    """A1111 txt2img: sigma_min = model_wrap.sigmas[0], sigma_max = model_wrap.sigmas[-1], n = steps."""
    for schedule in (None, "karras", "exponential", "sgm_uniform", "align_your_steps"):
        levels = get_sampler(name).levels(SCHED, 12, schedule)
        assert endpoints(levels, Toy()) == pytest.approx((SIGMA_MAX, SIGMA_MIN, 12), rel=1e-6)


def test_img2img_runs_between_the_ends_of_the_cut_schedule_as_a1111():
    """A1111 img2img: sigma_max = sigma_sched[0], sigma_min = sigma_sched[-2], n = len(sigma_sched) - 1, with
    sigma_sched = sigmas[steps - t_enc - 1:] of the chosen schedule."""
    steps, strength = 20, 0.5
    karras = SCHED.get_sigmas(steps, "karras")
    sched = karras[steps - int(strength * steps) - 1:]
    levels = get_sampler("DPM fast").levels(SCHED, steps, "karras", strength=strength)
    torch.testing.assert_close(levels, sched)
    assert endpoints(levels, Toy()) == pytest.approx((float(sched[0]), float(sched[-2]), 11))


def test_a_single_step_runs_to_the_model_sigma_min():
    assert endpoints(get_sampler("DPM fast").levels(SCHED, 1), Toy()) == pytest.approx((SIGMA_MAX, SIGMA_MIN, 1))


def test_both_are_registered_with_a1111_labels_aliases_and_options():
    fast, adaptive = get_sampler("k_dpm_fast"), get_sampler("k_dpm_ad")
    assert (fast.id, fast.label, adaptive.id, adaptive.label) == ("dpm_fast", "DPM fast", "dpm_adaptive", "DPM adaptive")
    for s in (fast, adaptive):
        assert s.family == "k" and s.stochastic and s.uses_eta and s.default_eta == 1.0
        assert dict(s.a1111_options) == {"uses_ensd": True}


# -- the pipeline on the tiny random model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    nets = random_networks(TINY_SD1, 0)
    return Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1,
                    devices.Precision(torch.device("cpu"), torch.float32), name="tiny")


@pytest.mark.parametrize("label", ["DPM fast", "DPM adaptive"])
def test_pipeline_txt2img_is_seed_deterministic_and_writes_the_a1111_label(pipe, label):
    kw = dict(steps=4, sampler=label, width=16, height=16)
    a = pipe.txt2img("a cat", seed=5, **kw)
    b = pipe.txt2img("a cat", seed=5, output_type="latent", **kw)
    c = pipe.txt2img("a cat", seed=6, output_type="latent", **kw)
    assert torch.equal(b, pipe.txt2img("a cat", seed=5, output_type="latent", **kw))
    assert not torch.allclose(b, c)
    assert f"Sampler: {label}," in a.infotexts[0]
    assert a[0].size == (16, 16)


@pytest.mark.parametrize("label", ["DPM fast", "DPM adaptive"])
def test_pipeline_img2img_runs_from_the_noised_init(pipe, label):
    from PIL import Image
    image = Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8))
    kw = dict(steps=10, seed=2, sampler=label, output_type="latent")
    low = pipe.img2img(image, "a dog", strength=0.3, **kw)
    assert torch.isfinite(low).all() and low.shape[:2] == (1, 4)
    assert torch.equal(low, pipe.img2img(image, "a dog", strength=0.3, **kw))
    assert not torch.allclose(low, pipe.img2img(image, "a dog", strength=0.9, **kw))
