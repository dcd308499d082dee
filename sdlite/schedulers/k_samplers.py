"""The k-samplers: solvers of the probability-flow ODE / reverse SDE in sigma space.

The state is ``x = x0 + sigma * eps`` (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", the VE form); the denoiser ``D(x, sigma)`` estimates x0 and the ODE
is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras eqs. 1 and 3 with sigma(t) = t). Every sampler here
follows Katherine Crowson's k-diffusion (``k_diffusion/sampling.py``), which the AUTOMATIC1111 web UI
uses, step for step, with the same first/last-step special cases.

Signature of every sampler::

    fn(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0) -> x

``x`` is already at noise level ``sigmas[0]`` (txt2img: unit noise * sigmas[0]); ``sigmas`` is the
decreasing ``[n + 1]`` schedule ending in 0. The step coefficients are computed in float64 from the
sigmas (Python floats), the state is kept in float32 (or float64 if given). ``eta`` only affects the
ancestral/SDE samplers (0 makes them deterministic). ``callback(i, sigma_i, x, denoised)`` is called after
step i with the updated x and the step's x0 estimate; returning exactly ``False`` stops sampling and
returns the current x.

Noise: ``torch.randn(shape, generator=generator, device=generator.device, dtype=float32)`` moved to x's
device (by :func:`sdlite.devices.to_device`, which does not make the host wait for the GPU), so a CPU
generator gives the same result on every device. The SDE samplers of k-diffusion draw
their noise as increments of one Brownian path (torchsde's Brownian tree), so that a picture changes little
with the step count. No Brownian tree is needed for the *distribution*: the 2M/3M SDE steps use disjoint
intervals, whose increments are independent Gaussians; DPM++ SDE uses two nested intervals per step, and
their increments are built from two independent Gaussians with the Brownian covariance (see
:func:`sample_dpmpp_sde`). The values differ from A1111's, so its SDE pictures are not bit-reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..devices import to_device
from .denoiser import Denoiser

Callback = Callable[[int, float, torch.Tensor, torch.Tensor], Any]


# -- helpers ------------------------------------------------------------------------------------------

def _start(x: torch.Tensor, sigmas: torch.Tensor | list[float]) -> tuple[torch.Tensor, list[float]]:
    """Upcast the state, and take the sigmas as float64 Python numbers (device-free scalars)."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    return x.to(torch.promote_types(x.dtype, torch.float32)), s


def randn_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like x: from ``generator`` on its own device (CPU → device-independent).

    ``generator`` may also be a list with one generator per image of the batch, as the A1111 web UI keeps
    one random stream per seed: image i's noise then depends only on its own seed, so image i of a batch
    equals the single image made with that seed."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return to_device(torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                                      for g in generator]), x.device, x.dtype)
    return to_device(torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32),
                     x.device, x.dtype)


def _stopped(callback: Callback | None, i: int, level: float, x: torch.Tensor, denoised: torch.Tensor) -> bool:
    return callback is not None and callback(i, level, x, denoised) is False


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eqs. 1 and 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from → sigma_to into a deterministic step down to ``sigma_down`` and fresh noise
    of std ``sigma_up`` with sigma_down² + sigma_up² = sigma_to². eta = 1 gives DDPM's ancestral
    variance sigma_up² = sigma_to² (sigma_from² - sigma_to²) / sigma_from² (DDPM eq. 7 in sigma space);
    eta = 0 is the ODE step."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


# -- first order ----------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """Euler steps on the probability-flow ODE: Karras et al. 2022, Algorithm 2 without churn
    (S_churn = 0, A1111's default). ``eta`` and ``generator`` are unused."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Ancestral sampling with Euler steps ("Euler a"): an Euler step down to sigma_down, then fresh noise
    of std sigma_up (see :func:`get_ancestral_step`; k-diffusion ``sample_euler_ancestral``)."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
               callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1; Luo et al. 2023,
    "Latent Consistency Models", Algorithm 1) in sigma space: jump to the clean estimate, then noise it afresh
    to the next level,

        x_{i+1} = D(x_i, sigma_i) + sigma_{i+1} z,   z ~ N(0, I),

    and at sigma_{i+1} = 0 return D itself. The new noise replaces x_i's instead of continuing it, which is why
    it needs a model distilled for such jumps (an LCM); A1111's "LCM" runs it with the consistency wrapper of
    :mod:`.lcm`. ``eta`` is unused (A1111 has none for it)."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        x = denoised + s[i + 1] * randn_like(denoised, generator) if s[i + 1] > 0 else denoised
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


# -- second order (two network calls per step) --------------------------------------------------------

@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """Heun's method (explicit trapezoid): Karras et al. 2022, Algorithm 1 / Algorithm 2 without churn.
    The step to sigma = 0 is an Euler step (the second derivative would divide by 0)."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        x, denoised = heun_step(denoiser, x, s[i], s[i + 1])
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :func:`sample_heun` from ``sigma`` to ``sigma_next``: (new x, the denoised estimate at sigma).
    Two network calls, one for the step to sigma = 0 (an Euler step there)."""
    denoised = denoiser(x, sigma)
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt, denoised
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next))
    return x + (d + d_2) / 2 * dt, denoised


@torch.no_grad()
def sample_dpm_2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2) in sigma space: an Euler half step to the
    geometric mean sigma_mid = sqrt(sigma_i sigma_{i+1}) (the midpoint in log sigma), then the full step with
    the slope at the midpoint. Euler for the last step (k-diffusion ``sample_dpm_2``)."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        d = to_d(x, s[i], denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            sigma_mid = math.exp((math.log(s[i]) + math.log(s[i + 1])) / 2)
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
            x = x + d_2 * (s[i + 1] - s[i])
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


def half_log_snr(sigma: float) -> float:
    """lambda = -log sigma, the half log-SNR in sigma space (alpha = 1); +inf at sigma = 0, as k-diffusion's
    tensor -log gives it. An ancestral step with eta > 1 aims there on a large step: exp(-inf) = 0, so the
    step lands on the denoised estimate, and its noise is all of the next level's."""
    return -math.log(sigma) if sigma > 0 else math.inf


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """"DPM2 a": a DPM-Solver-2 step down to sigma_down, then fresh noise of std sigma_up
    (k-diffusion ``sample_dpm_2_ancestral``). Where sigma_down is 0 (the last step, or eta > 1 on a large
    step) it takes an Euler step and, as k-diffusion does, adds no noise: the same images as A1111's."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        d = to_d(x, s[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = math.exp((math.log(s[i]) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - s[i])
            if sigma_up > 0:
                x = x + randn_like(x, generator) * sigma_up
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


# -- linear multistep -------------------------------------------------------------------------------------

def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """∫_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau, where l_j is the Lagrange basis polynomial through the last
    ``order`` sigmas that is 1 at sigma_{i-j} (Adams–Bashforth on a non-uniform grid).

    k-diffusion integrates this numerically with scipy's ``quad``; l_j is a polynomial, so here it is
    integrated exactly: expand it in u = tau - sigma_i, then ∫_0^h sum c_m u^m du = sum c_m h^(m+1) / (m+1).

    >>> round(lms_coefficient(1, [2.0, 1.0], 0, 0), 12)   # order 1 = Euler: the step size
    -1.0
    """
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    poly = [1.0]  # coefficients of u^0, u^1, ... (u = tau - sigma_i)
    for k in range(order):
        if k == j:
            continue
        root = sigmas[i - k] - sigmas[i]
        denom = sigmas[i - j] - sigmas[i - k]
        # poly *= (u - root) / denom
        poly = [((poly[m - 1] if m > 0 else 0.0) - root * (poly[m] if m < len(poly) else 0.0)) / denom
                for m in range(len(poly) + 1)]
    h = sigmas[i + 1] - sigmas[i]
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))


@torch.no_grad()
def sample_lms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
               callback: Callback | None = None, eta: float = 1.0, order: int = 4) -> torch.Tensor:
    """Linear multistep (order 4): x_{i+1} = x_i + sum_j c_ij d_{i-j}, c_ij from :func:`lms_coefficient`
    (k-diffusion ``sample_lms``; Karras et al. 2022 mention LMS as one of the ODE solvers). The order ramps up
    1, 2, 3, 4 over the first steps."""
    x, s = _start(x, sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        ds.append(to_d(x, s[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, s, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


# -- DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling") -------------------------
# In terms of lambda = -log sigma (half the log-SNR of the VP process), the data-prediction form of the ODE
# solution over a step of size h = lambda_{i+1} - lambda_i is (DPM-Solver++ eq. 9 divided by alpha):
#   x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) * D,
# where D is x0 predicted at (or extrapolated to) the step.

@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
    with r = h_{i-1} / h_i. First-order (DPM-Solver++(1) = DDIM) on the first and the last step."""
    x, s = _start(x, sigmas)
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # (sigma_next / sigma) x - expm1(-inf) D = D
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        generator: torch.Generator | None = None, callback: Callback | None = None,
                        eta: float = 1.0, solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, section 5 / appendix: SDE-DPM-Solver++(2M)), k-diffusion
    ``sample_dpmpp_2m_sde``. With eta_h = eta h:
        x = (sigma_{i+1}/sigma_i) e^(-eta_h) x + (1 - e^(-h - eta_h)) x0_i + correction
            + sigma_{i+1} sqrt(1 - e^(-2 eta_h)) z
    with r = h_{i-1} / h and the second-order correction (x0_i - x0_{i-1}) / r times, for ``midpoint``,
    0.5 (1 - e^(-h - eta_h)), for ``heun``, 1 - (1 - e^(-h - eta_h)) / (h + eta_h). eta = 0 is exactly DPM++ 2M.
    The step to sigma = 0 returns x0."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")
    x, s = _start(x, sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)  # 1 - e^(-h - eta_h)
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + randn_like(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)))
        old_denoised, h_last = denoised, h
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                             generator: torch.Generator | None = None, callback: Callback | None = None,
                             eta: float = 1.0) -> torch.Tensor:
    """"DPM++ 2M SDE Heun": :func:`sample_dpmpp_2m_sde` with ``solver_type="heun"``."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta, solver_type="heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                        generator: torch.Generator | None = None, callback: Callback | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): the third-order multistep data-prediction
    update of DPM-Solver++ (Lu et al. 2022b, appendix) with the SDE's step h_eta = (1 + eta) h, using the
    last three x0 estimates; order ramps 1, 2, 3. eta = 0 is the deterministic DPM-Solver++(3M)."""
    x, s = _start(x, sigmas)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / r
            if eta:
                x = x + randn_like(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                              generator: torch.Generator | None = None, callback: Callback | None = None,
                              eta: float = 1.0) -> torch.Tensor:
    """"DPM++ 2S a": a single-step DPM-Solver++(2S) step (Lu et al. 2022b, Algorithm 1, r = 1/2) down to
    sigma_down, then fresh noise of std sigma_up (k-diffusion ``sample_dpmpp_2s_ancestral``)."""
    x, s = _start(x, sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        else:
            h = math.log(s[i]) - math.log(sigma_down)
            sigma_s = math.exp(-(-math.log(s[i]) + h / 2))  # the midpoint in lambda = -log sigma
            x_2 = (sigma_s / s[i]) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoiser(x_2, sigma_s)
            x = (sigma_down / s[i]) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                     generator: torch.Generator | None = None, callback: Callback | None = None,
                     eta: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """"DPM++ SDE": the stochastic single-step DPM-Solver++ of k-diffusion ``sample_dpmpp_sde`` (r = 1/2):
    an ancestral DPM-Solver++(1) step to the intermediate lambda_i + r h, a second x0 estimate there, then an
    ancestral step over the whole interval with D = (1 - 1/(2r)) x0_i + 1/(2r) x0_mid. Euler for the last step.

    The two noises are normalised increments of one Brownian motion W(sigma) over the nested intervals
    [sigma_s, sigma_i] and [sigma_{i+1}, sigma_i] (k-diffusion: ``BrownianTreeNoiseSampler``); they are
    correlated: z_1 = dW_1 / sqrt(sigma_i - sigma_s), z_2 = (dW_1 + dW_rest) / sqrt(sigma_i - sigma_{i+1}) with
    dW_rest over [sigma_{i+1}, sigma_s] independent of dW_1. (Independent z_1, z_2 would bias the sampler.)"""
    x, s = _start(x, sigmas)

    def sigma_fn(lam: float) -> float:
        return math.exp(-lam)

    lam_fn = half_log_snr

    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        if s[i + 1] == 0:
            x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        else:
            lam, lam_next = lam_fn(s[i]), lam_fn(s[i + 1])
            h = lam_next - lam
            lam_s = lam + h * r
            fac = 1 / (2 * r)
            # Step 1: to the intermediate point.
            sigma, sigma_s, sigma_next = s[i], sigma_fn(lam_s), s[i + 1]
            if eta:  # normalised Brownian increments over [sigma_s, sigma] and the nesting [sigma_next, sigma]
                z_1, z_rest = randn_like(x, generator), randn_like(x, generator)
                z_2 = (math.sqrt(sigma - sigma_s) * z_1 + math.sqrt(sigma_s - sigma_next) * z_rest) \
                    / math.sqrt(sigma - sigma_next)
            sd, su = get_ancestral_step(sigma, sigma_s, eta)
            lam_s_ = lam_fn(sd)
            x_2 = (sigma_fn(lam_s_) / sigma) * x - math.expm1(lam - lam_s_) * denoised
            if su > 0:
                x_2 = x_2 + z_1 * su
            denoised_2 = denoiser(x_2, sigma_s)
            # Step 2: the whole interval.
            sd, su = get_ancestral_step(sigma, sigma_next, eta)
            lam_next_ = lam_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(lam_next_) / sigma) * x - math.expm1(lam - lam_next_) * denoised_d
            if su > 0:
                x = x + z_2 * su
        if _stopped(callback, i, s[i], x, denoised):
            break
    return x
