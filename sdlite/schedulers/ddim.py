"""DDIM and PLMS: the timestep samplers of the original CompVis code (``ldm/models/diffusion/ddim.py``,
``plms.py``), in the VP space x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with a_t = alphabar_t.

Signature::

    fn(denoiser, x, timesteps, *, generator=None, callback=None, eta=0.0) -> x

``x`` is x_t at ``timesteps[0]`` (txt2img: unit noise); ``timesteps`` are the decreasing integer timesteps
(:meth:`DiscreteSchedule.ddim_timesteps`: 981, 961, ..., 1 for 50 steps). As in CompVis'
``make_ddim_sampling_parameters``, the step from the smallest timestep goes to a_prev = alphabar_0 (not 1):
the result is x at t = 0, which is x0 up to sqrt(1 - alphabar_0) ≈ 0.03 of noise — what every SD
implementation returns. ``callback(i, t_i, x, pred_x0)`` after each step; returning exactly ``False`` stops.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .denoiser import Denoiser
from .k_samplers import Callback, _stopped, randn_like


def _alphas(denoiser: Denoiser, timesteps: torch.Tensor | list[int]) -> tuple[list[int], list[float], list[float]]:
    """Integer timesteps, a_t and a_prev for each step (float64 Python numbers). a_prev of a step is a_t of the
    next visited timestep, and alphabar_0 after the last (CompVis: alphas_prev = [a[0]] + a[ts[:-1]])."""
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    ac = denoiser.schedule.alphas_cumprod.tolist()
    a_t = [ac[t] for t in ts]
    a_prev = a_t[1:] + [ac[0]]
    return ts, a_t, a_prev


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), eq. 12::

        pred_x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                       ("predicted x0")
        dir_xt  = sqrt(1 - a_prev - sigma_t^2) eps                            ("direction pointing to x_t")
        x_prev  = sqrt(a_prev) pred_x0 + dir_xt + sigma_t z                    (random noise)

    with sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16). eta = 0 is the
    deterministic DDIM, eta = 1 the DDPM posterior variance."""

    def noises(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        e_t = denoiser.eps(x, t)
        return e_t, e_t

    return _ddim_steps(noises, denoiser, x, timesteps, generator, callback, eta)


@torch.no_grad()
def sample_ddim_cfgpp(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, *,
                      generator: torch.Generator | None = None, callback: Callback | None = None,
                      eta: float = 0.0) -> torch.Tensor:
    """DDIM with CFG++ (Chung, Kim, Park, Nam & Ye 2024, "CFG++: Manifold-constrained Classifier Free
    Guidance for Diffusion Models"), as the A1111 web UI runs it ("DDIM CFG++"): the DDIM step of
    :func:`sample_ddim`, whose predicted x0 comes from the guided noise e_t but whose direction back to
    x_prev follows the unconditional noise e_u::

        pred_x0 = (x_t - sqrt(1 - a_t) e_t) / sqrt(a_t)
        x_prev  = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma_t^2) e_u + sigma_t z

    Guidance then stays on the data manifold, so CFG++ takes small scales: e_t = e_u + lambda (e_c - e_u)
    with lambda in [0, 1]. A1111 maps its usual CFG scale onto that range by dividing it by 12.5, and
    so does the pipeline for this sampler (:meth:`Sampler.model_guidance_scale`)."""
    return _ddim_steps(denoiser.eps_and_uncond_eps, denoiser, x, timesteps, generator, callback, eta)


def _ddim_steps(noises: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], denoiser: Denoiser,
                x: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None,
                callback: Callback | None, eta: float) -> torch.Tensor:
    """The DDIM loop: ``noises(x, t)`` gives the noise that predicts x0 and the one that points back to x_t."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ts, a_t, a_prev = _alphas(denoiser, timesteps)
    for i, t in enumerate(ts):
        sigma_t = eta * math.sqrt((1 - a_prev[i]) / (1 - a_t[i]) * (1 - a_t[i] / a_prev[i]))
        e_x0, e_dir = noises(x, t)
        pred_x0 = (x - math.sqrt(1 - a_t[i]) * e_x0) / math.sqrt(a_t[i])
        dir_xt = math.sqrt(1 - a_prev[i] - sigma_t**2) * e_dir
        x = math.sqrt(a_prev[i]) * pred_x0 + dir_xt
        if sigma_t > 0:
            x = x + sigma_t * randn_like(x, generator)
        if _stopped(callback, i, t, x, pred_x0):
            break
    return x


@torch.no_grad()
def sample_plms(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion
    Models on Manifolds", PNDM): the DDIM (eta = 0) transfer x_t → x_prev applied with a combined eps', eq. 12:

        step 1:  eps' = (e_t + e(x_prev, t_next)) / 2           (pseudo improved Euler: 2 network calls)
        step 2:  eps' = (3 e_t - e_{t-1}) / 2                    (Adams–Bashforth 2)
        step 3:  eps' = (23 e_t - 16 e_{t-1} + 5 e_{t-2}) / 12   (AB3)
        then:    eps' = (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24   (AB4)

    exactly as CompVis' ``PLMSSampler``: the history keeps each step's first eps e_t (not eps'), and the first
    step evaluates the network twice (n + 1 calls for n steps). PLMS is deterministic: ``eta`` and
    ``generator`` are ignored, as in A1111 (CompVis raised for eta != 0; A1111 API clients send eta = 1)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ts, a_t, a_prev = _alphas(denoiser, timesteps)
    old_eps: list[torch.Tensor] = []

    def transfer(x: torch.Tensor, e: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDIM eta = 0 step from ts[i] with noise estimate e: (x_prev, pred_x0)."""
        pred_x0 = (x - math.sqrt(1 - a_t[i]) * e) / math.sqrt(a_t[i])
        return math.sqrt(a_prev[i]) * pred_x0 + math.sqrt(1 - a_prev[i]) * e, pred_x0

    for i, t in enumerate(ts):
        t_next = ts[min(i + 1, len(ts) - 1)]
        e_t = denoiser.eps(x, t)
        if len(old_eps) == 0:
            x_prev, _ = transfer(x, e_t, i)
            e_prime = (e_t + denoiser.eps(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = transfer(x, e_prime, i)
        old_eps.append(e_t)
        if len(old_eps) > 3:
            old_eps.pop(0)
        if _stopped(callback, i, t, x, pred_x0):
            break
    return x
