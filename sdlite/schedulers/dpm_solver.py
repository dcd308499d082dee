"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps", arXiv:2206.00927): the A1111 samplers "DPM fast" and "DPM adaptive".

They follow k-diffusion's ``DPMSolver`` (``sample_dpm_fast``, ``sample_dpm_adaptive``), which A1111 calls.
Time is the half log-SNR of the paper, which in sigma space (alpha = 1) is

    t = lambda = -log sigma,        sigma(t) = e^(-t),        h = t_next - t > 0.

With ``eps(x, t) = (x - D(x, sigma)) / sigma`` the probability-flow ODE is dx/dlambda = -e^(-lambda) eps, and
its exact solution over a step (paper eq. 3.4 with alpha = 1) is

    x_next = x - ∫_t^t_next e^(-lambda) eps(x_lambda, lambda) dlambda.

Expanding eps in lambda to order k - 1 and integrating the exponential exactly gives DPM-Solver-k
(paper Algorithms 1 and 2; :func:`dpm_solver_1_step`, :func:`dpm_solver_2_step`, :func:`dpm_solver_3_step`),
whose local error is O(h^(k + 1)).

Unlike the other k-samplers these two do not walk a given list of sigmas: A1111 hands them only
``sigma_max``, ``sigma_min`` and a count ``n`` (see :func:`endpoints`), and they stop at sigma_min, so the
result keeps sigma_min of noise (0.029 for SD) as in A1111.

``eta`` > 0 makes each step ancestral as in k-diffusion: the deterministic step goes down to
``sigma_down`` (:func:`~sdlite.schedulers.k_samplers.get_ancestral_step`, clipped at sigma_min), then fresh
noise brings the variance back up to the step's target sigma. A1111 passes its "Eta for ancestral samplers",
1.0 by default, so by default both samplers draw noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ArgumentError, GenerationError
from .denoiser import Denoiser
from .k_samplers import Callback, _stopped, get_ancestral_step, half_log_snr, randn_like


def sigma_of(t: float) -> float:
    """sigma(t) = e^(-t): the noise level at half log-SNR t."""
    return math.exp(-t)


def t_of(sigma: float) -> float:
    """t(sigma) = -log sigma = lambda, the half log-SNR (alpha = 1 in sigma space): the paper's time
    variable, :func:`~sdlite.schedulers.k_samplers.half_log_snr` (infinite at sigma = 0)."""
    return half_log_snr(sigma)


def _eps(denoiser: Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    """The noise prediction eps(x, t) = (x - D(x, sigma)) / sigma, sigma = e^(-t)."""
    sigma = sigma_of(t)
    return (x - denoiser(x, sigma)) / sigma


# -- the single steps (paper section 3.3, Algorithms 1 and 2) ---------------------------------------------------

def dpm_solver_1_step(x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-1 (paper eq. 3.7, = DDIM): x_next = x - sigma(t_next) (e^h - 1) eps(x, t)."""
    h = t_next - t
    return x - sigma_of(t_next) * math.expm1(h) * eps


def dpm_solver_2_step(denoiser: Denoiser, x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor,
                      r1: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver-2 (paper Algorithm 1): a DPM-Solver-1 step to s1 = t + r1 h, a second eps there, then

        x_next = x - sigma(t_next) (e^h - 1) eps - sigma(t_next) / (2 r1) (e^h - 1) (eps(u1, s1) - eps).

    Returns ``(x_next, eps(u1, s1))``; the latter lets DPM adaptive reuse it (see :func:`dpm_solver_3_step`)."""
    h = t_next - t
    s1 = t + r1 * h
    u1 = x - sigma_of(s1) * math.expm1(r1 * h) * eps
    eps_r1 = _eps(denoiser, u1, s1)
    sigma_next = sigma_of(t_next)
    x_next = x - sigma_next * math.expm1(h) * eps - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
    return x_next, eps_r1


def dpm_solver_3_step(denoiser: Denoiser, x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor,
                      r1: float = 1 / 3, r2: float = 2 / 3, eps_r1: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver-3 (paper Algorithm 2, r1 = 1/3, r2 = 2/3): with s1 = t + r1 h, s2 = t + r2 h,

        u1 = x - sigma(s1) (e^(r1 h) - 1) eps
        D1 = eps(u1, s1) - eps
        u2 = x - sigma(s2) (e^(r2 h) - 1) eps - sigma(s2) (r2 / r1) ((e^(r2 h) - 1) / (r2 h) - 1) D1
        D2 = eps(u2, s2) - eps
        x_next = x - sigma(t_next) (e^h - 1) eps - sigma(t_next) / r2 ((e^h - 1) / h - 1) D2.

    ``eps_r1``: eps(u1, s1) if already known (u1 is the intermediate point of :func:`dpm_solver_2_step` with
    the same r1), which saves one network call."""
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_r1 is None:
        u1 = x - sigma_of(s1) * math.expm1(r1 * h) * eps
        eps_r1 = _eps(denoiser, u1, s1)
    d1 = eps_r1 - eps
    sigma_s2 = sigma_of(s2)
    u2 = (x - sigma_s2 * math.expm1(r2 * h) * eps
          - sigma_s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * d1)
    d2 = _eps(denoiser, u2, s2) - eps
    sigma_next = sigma_of(t_next)
    return x - sigma_next * math.expm1(h) * eps - sigma_next / r2 * (math.expm1(h) / h - 1) * d2


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where the deterministic part of a step ends, and the std of the noise added after it.

    eta = 0: (t_next, 0). Else the step goes down to sigma_down of :func:`get_ancestral_step` (but not below
    sigma_min = sigma(t_end)), and noise of std sqrt(sigma(t_next)^2 - sigma(t_next_)^2) brings the noise back
    to sigma(t_next), as k-diffusion does."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(sigma_of(t), sigma_of(t_next), eta)
    t_next_ = min(t_end, t_of(sigma_down))
    return t_next_, math.sqrt(max(sigma_of(t_next) ** 2 - sigma_of(t_next_) ** 2, 0.0))


def endpoints(sigmas: torch.Tensor | list[float], denoiser: Denoiser) -> tuple[float, float, int]:
    """(sigma_max, sigma_min, n) of a run, from the ``[n + 1]`` levels the registry hands every k-sampler.

    A1111 (``sd_samplers_kdiffusion.py``) passes txt2img the model's sigma_max and sigma_min and n = steps
    (the registry gives these samplers the model's own levels then, see ``Sampler.endpoints_only``), and img2img
    ``sigma_sched[0]``, ``sigma_sched[-2]`` (the last nonzero level) and ``len(sigma_sched) - 1``. Here too:
    sigmas[0], the last nonzero sigma, len - 1. With a single nonzero level (one step) the run ends at the
    model's sigma_min, as A1111's txt2img does (A1111's img2img would make no step at all then)."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    positive = [v for v in s if v > 0]
    if not positive:
        raise ArgumentError("DPM fast / DPM adaptive need at least one nonzero sigma")
    sigma_max, n = positive[0], len(s) - 1
    sigma_min = positive[-1] if len(positive) > 1 else min(sigma_max, denoiser.schedule.sigma_min)
    return sigma_max, sigma_min, n


# -- DPM-Solver-fast (paper section 3.4) --------------------------------------------------------------------

def fast_orders(nfe: int) -> list[int]:
    """The orders of DPM-Solver-fast's K = floor(nfe / 3) + 1 steps (paper section 3.4), spending exactly ``nfe``
    network calls: third order everywhere, the remainder at the end.

    >>> fast_orders(10), fast_orders(11), fast_orders(12)
    ([3, 3, 3, 1], [3, 3, 3, 2], [3, 3, 3, 2, 1])
    """
    if nfe < 1:
        raise ArgumentError(f"DPM fast needs at least 1 step, got {nfe}")
    k = nfe // 3 + 1
    return [3] * (k - 2) + [2, 1] if nfe % 3 == 0 else [3] * (k - 1) + [nfe % 3]


@torch.no_grad()
def dpm_solver_fast(denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, nfe: int, *,
                    eta: float = 0.0, s_noise: float = 1.0, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver-fast from sigma_max down to sigma_min with ``nfe`` network calls: the steps of
    :func:`fast_orders`, uniform in t = -log sigma (paper section 3.4; k-diffusion ``dpm_solver_fast``).

    ``callback(i, sigma_i, x, denoised)`` after step i, with the x0 estimate at its start.

    >>> zero = lambda x, sigma: torch.zeros_like(x)      # D = 0: dx/dsigma = x / sigma, so x = x_T sigma / sigma_T
    >>> round(dpm_solver_fast(zero, torch.ones(1, 1, 1, 1), 0.5, 2.0, 6).item(), 6)
    0.25
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    orders = fast_orders(int(nfe))
    t_start, t_end = t_of(sigma_max), t_of(sigma_min)
    ts = torch.linspace(t_start, t_end, len(orders) + 1, dtype=torch.float64).tolist()
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = _eps(denoiser, x, t)
        denoised = x - sigma_of(t) * eps
        if order == 1:
            x = dpm_solver_1_step(x, t, t_next_, eps)
        elif order == 2:
            x, _ = dpm_solver_2_step(denoiser, x, t, t_next_, eps)
        else:
            x = dpm_solver_3_step(denoiser, x, t, t_next_, eps)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (sigma_up * s_noise)
        if _stopped(callback, i, sigma_of(t), x, denoised):
            break
    return x


# -- the adaptive step size solver (paper section 4 and appendix, Algorithm "DPM-Solver-23") ---------------------

@dataclass
class PIDStepSizeController:
    """Step size control of Söderlind ("Digital filters in adaptive time-stepping", 2003), as k-diffusion's
    ``PIDStepSizeController``: with the inverse errors e_n = 1 / (err_n + 1e-8) of the last three tries,

        h <- h * limiter(e_n^b1 e_{n-1}^b2 e_{n-2}^b3),   limiter(u) = 1 + atan(u - 1),
        b1 = (kP + kI + kD) / k,   b2 = -(kP + 2 kD) / k,   b3 = kD / k,

    k the order of the error estimate. A step is accepted when the factor is >= ``accept_safety``; only accepted
    errors enter the history. The defaults kP = kD = 0, kI = 1 make it the classic h <- h (1 / err)^(1/k)."""

    h: float
    pcoeff: float
    icoeff: float
    dcoeff: float
    order: float
    accept_safety: float
    eps: float = 1e-8
    errs: list[float] = field(default_factory=list)

    def propose_step(self, error: float) -> bool:
        """Update :attr:`h` from this try's error; return whether the try is accepted."""
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / self.order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / self.order
        b3 = self.dcoeff / self.order
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:  # the first try stands in for the two before it
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = 1 + math.atan(self.errs[0] ** b1 * self.errs[1] ** b2 * self.errs[2] ** b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def dpm_solver_adaptive(denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                        eta: float = 0.0, s_noise: float = 1.0, generator: torch.Generator | None = None,
                        callback: Callback | None = None, info: dict | None = None) -> torch.Tensor:
    """Adaptive step size DPM-Solver from sigma_max down to sigma_min (paper section 4, k-diffusion
    ``dpm_solver_adaptive``, whose defaults these are; A1111 overrides none of them).

    Each try from t with step h computes a lower- and a higher-order solution, x_low and x_high (order 3:
    DPM-Solver-2 with r1 = 1/3 and DPM-Solver-3, sharing eps at t + h/3, so 3 network calls; order 2:
    DPM-Solver-1 and -2), and the scaled error

        delta = max(atol, rtol * max(|x_low|, |x_prev|))      (elementwise; x_prev = x_low of the last accepted try)
        err   = || (x_low - x_high) / delta ||_2 / sqrt(numel)

    over the whole batch. :class:`PIDStepSizeController` (of order 1.5 when eta > 0, as k-diffusion) accepts or
    rejects the try and proposes the next h; an accepted try continues from x_high.

    ``callback(i, sigma, x, denoised)`` after every try (rejected ones too, as A1111 counts them), with the
    current x and the x0 estimate at the try's start. ``info``, if given, receives the counts ``steps``,
    ``nfe``, ``n_accept``, ``n_reject``."""
    if order not in (2, 3):
        raise ArgumentError(f"DPM adaptive's order must be 2 or 3, got {order}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    t_start, t_end = t_of(sigma_max), t_of(sigma_min)
    counts = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0} if info is None else info
    counts.update(steps=0, nfe=0, n_accept=0, n_reject=0)
    pid = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev = t_start, x
    while s < t_end - 1e-5:
        s_try, t = s, min(t_end, s + pid.h)
        t_, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps = _eps(denoiser, x, s)
        denoised = x - sigma_of(s) * eps
        if order == 2:
            x_low = dpm_solver_1_step(x, s, t_, eps)
            x_high, _ = dpm_solver_2_step(denoiser, x, s, t_, eps)
        else:
            x_low, eps_r1 = dpm_solver_2_step(denoiser, x, s, t_, eps, r1=1 / 3)
            x_high = dpm_solver_3_step(denoiser, x, s, t_, eps, eps_r1=eps_r1)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = torch.linalg.vector_norm((x_low - x_high) / delta).item() / math.sqrt(x.numel())
        if not math.isfinite(error):  # no step size makes progress from a NaN/inf latent: it would try forever
            raise GenerationError("DPM adaptive: the latent became NaN or infinite, so no step size can be "
                                  "accepted (an extreme guidance scale or a broken model); stopped")
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if sigma_up > 0:
                x = x + randn_like(x, generator) * (sigma_up * s_noise)
            s = t
            counts["n_accept"] += 1
        else:
            counts["n_reject"] += 1
        counts["nfe"] += order
        counts["steps"] += 1
        if _stopped(callback, counts["steps"] - 1, sigma_of(s_try), x, denoised):
            break
    return x


# -- the sampler signature of the registry -------------------------------------------------------------------

@torch.no_grad()
def sample_dpm_fast(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    eta: float = 1.0) -> torch.Tensor:
    """"DPM fast": :func:`dpm_solver_fast` with n = len(sigmas) - 1 network calls between the ends of
    ``sigmas`` (see :func:`endpoints`); k-diffusion ``sample_dpm_fast``."""
    sigma_max, sigma_min, n = endpoints(sigmas, denoiser)
    return dpm_solver_fast(denoiser, x, sigma_min, sigma_max, n, eta=eta, generator=generator, callback=callback)


@torch.no_grad()
def sample_dpm_adaptive(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        generator: torch.Generator | None = None, callback: Callback | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """"DPM adaptive": :func:`dpm_solver_adaptive` between the ends of ``sigmas`` (see :func:`endpoints`); the
    number of steps is the solver's own, not len(sigmas) - 1 (A1111 ignores the step count too)."""
    sigma_max, sigma_min, _ = endpoints(sigmas, denoiser)
    return dpm_solver_adaptive(denoiser, x, sigma_min, sigma_max, eta=eta, generator=generator, callback=callback)
