"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models") on a strided
subset of the training timesteps, in the VP space x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphabar_t).

Signature: ``fn(denoiser, x, timesteps, *, generator=None, callback=None, eta=1.0) -> x`` as the other
timestep samplers (:mod:`sdlite.schedulers.ddim`); ``eta`` is unused (DDPM is DDIM's eta = 1 member except
for the last step, which here goes to a_prev = 1, the clean sample, as in the original full-length DDPM).
"""

from __future__ import annotations

import math

import torch

from .denoiser import Denoiser
from .k_samplers import Callback, _stopped, randn_like


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                eta: float = 1.0) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0 = pred_x0), DDPM eqs. 6–7, on the visited
    timesteps t > t_prev. Over a stride the forward process has beta = 1 - a_t / a_prev, so::

        mean = sqrt(a_prev) beta / (1 - a_t) pred_x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a_t) x_t   (eq. 7)
        var  = (1 - a_prev) / (1 - a_t) beta                                          (beta-tilde, eq. 7)
        x_prev = mean + sqrt(var) z

    The variance is the original's "fixed small" choice (sigma_t^2 = beta-tilde_t, section 3.2), clipped below
    at 1e-20 as CompVis' ``posterior_log_variance_clipped``. The last step (to a_prev = 1) adds no noise (the
    original's ``nonzero_mask`` at t = 0). No clipping of pred_x0: latents are not bounded to [-1, 1]."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    ac = denoiser.schedule.alphas_cumprod.tolist()
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        a_t = ac[t]
        a_prev = 1.0 if last else ac[ts[i + 1]]
        beta = 1 - a_t / a_prev
        e_t = denoiser.eps(x, t)
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        x = (math.sqrt(a_prev) * beta / (1 - a_t)) * pred_x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        if not last:
            var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            x = x + math.sqrt(var) * randn_like(x, generator)
        if _stopped(callback, i, t, x, pred_x0):
            break
    return x
