"""Restart sampling (Xu, Deng, Cheng, Tian, Liu & Jaakkola 2023, "Restart Sampling for Improving Generative
Processes", arXiv:2306.14878), as AUTOMATIC1111's "Restart" sampler runs it (modules/sd_samplers_extra.py).

The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma is solved with Heun's method down the sigma
schedule. When it reaches t_min, the forward process pushes the state back up to t_max,

    x <- x + s_noise sqrt(t_max^2 - t_min^2) z,   z ~ N(0, I)          (the paper's Restart forward step, eq. 4)

which in the VE form x = x0 + sigma eps turns a sample at level t_min into one at t_max, and the ODE is solved
down from t_max to t_min again; this restart is done K times before the ODE goes on to 0. The added noise
contracts the errors the ODE has accumulated (the paper's Theorem 2) at the cost of more network calls.

A1111's choices for n = len(sigmas) - 1 steps (its ``restart_list`` is None):

- n < 20: no restart, plain Heun on the given sigmas;
- 20 <= n < 36: one restart (K = 1) of 9 Heun steps; n >= 36: K = 2 restarts of n // 4 steps each;
- the main schedule is then rebuilt as Karras (rho = 7) with n - K * steps_per_restart levels from the given
  sigmas[0] down to sigmas[-2] (then 0), whatever schedule was chosen, so that the run still makes n Heun steps;
- t_min is the main-schedule level nearest to 0.1 and t_max the level nearest to 2 (nearest in sigma; the
  first one on a tie); a restart happens if t_max lies above t_min, right after the step that reaches t_min;
- each restart's levels are Karras (rho = 7) from t_max down to t_min, steps_per_restart + 1 of them;
- noise is added wherever a step starts above where the previous one ended, with s_noise = 1 (A1111 passes
  none), drawn from the per-image generators as the other samplers' noise.

Network calls: every step is a Heun step (2 calls) except the final Euler step to 0 (1 call): 2 n - 1 in all.
The Karras levels are computed in float64 here (A1111: float32 on the device), so the levels differ from
A1111's in the 7th digit.
"""

from __future__ import annotations

from typing import Any

import torch

from .denoiser import Denoiser
from .k_samplers import Callback, _start, _stopped, heun_step, randn_like
from .schedule import karras_sigmas

SIGMA_RESTART_MIN = 0.1  # A1111's restart_list key: where the restart starts (t_min)
SIGMA_RESTART_MAX = 2.0  # ... and the level it jumps back up to (t_max)


def _nearest(levels: list[float], sigma: float) -> int:
    return min(range(len(levels)), key=lambda i: abs(levels[i] - sigma))


def restart_plan(sigmas: torch.Tensor | list[float]) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs of every Heun step of an A1111 Restart run on ``sigmas`` (``[n + 1]``,
    ending in 0), restarts included (see the module docstring). There are n pairs (fewer only where the level
    nearest 2 is not above the one nearest 0.1, so that A1111 skips the restart).

    >>> len(restart_plan(torch.linspace(10, 0, 31)))
    30
    """
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    steps = len(s) - 1
    if steps < 20:
        return list(zip(s[:-1], s[1:]))
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras_sigmas(steps - restart_steps * restart_times, s[-2], s[0]).tolist() + [0.0]
    i_min, i_max = _nearest(main, SIGMA_RESTART_MIN), _nearest(main, SIGMA_RESTART_MAX)
    plan = []
    for i in range(len(main) - 1):
        plan.append((main[i], main[i + 1]))
        if i + 1 == i_min and i_max < i_min:
            ladder = karras_sigmas(restart_steps + 1, main[i_min], main[i_max]).tolist()
            plan += list(zip(ladder[:-1], ladder[1:])) * restart_times
    return plan


@torch.no_grad()
def sample_restart(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Any = None,
                   callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Restart sampling on :func:`restart_plan`'s steps: Heun steps (:func:`~.k_samplers.heun_step`), and
    before a step that starts above the level reached, fresh noise s_noise sqrt(sigma^2 - sigma_reached^2) z
    from ``generator`` (one per image allowed). ``callback(i, sigma, x, denoised)`` after each of the n steps.
    ``eta`` is unused (A1111 has none for it)."""
    x, _ = _start(x, sigmas)
    reached = None
    for i, (sigma, sigma_next) in enumerate(restart_plan(sigmas)):
        if reached is not None and reached < sigma:
            x = x + randn_like(x, generator) * (s_noise * (sigma**2 - reached**2) ** 0.5)
        x, denoised = heun_step(denoiser, x, sigma, sigma_next)
        reached = sigma_next
        if _stopped(callback, i, sigma, x, denoised):
            break
    return x
