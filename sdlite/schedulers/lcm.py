"""What AUTOMATIC1111's "LCM" sampler puts around :func:`~sdlite.schedulers.k_samplers.sample_lcm`.

A latent consistency model (Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images
with Few-Step Inference", arXiv:2310.04378) is distilled on a skipping-step schedule: N = 50 of the T = 1000
timesteps, t_j = (j + 1) T / N - 1 = 19, 39, ..., 999 ("original_inference_steps" = 50). Its output is a
consistency function with the boundary condition f(x, 0) = x (Song et al. 2023, "Consistency Models", eq. 3):

    f(x, t) = c_skip(t) x + c_out(t) D(x, t),
    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out = s t / sqrt((s t)^2 + sigma_data^2),

with sigma_data = 0.5 and the timestep scaling s = 10 (LCM's released code and diffusers' ``LCMScheduler``).

A1111 (modules/sd_samplers_lcm.py, v1.8 and later) runs its "LCM" sampler, for every model, through a denoiser
built on that grid (``LCMCompVisDenoiser``), which :class:`LCMDenoiser` and :func:`lcm_sigmas` follow:

- the network is told the grid timestep nearest to sigma in log sigma (not the fractional sigma_to_t), while
  the input scaling c_in = 1 / sqrt(sigma^2 + 1) and x0 = x - sigma eps use sigma itself;
- f above is applied to that x0 and the sigma-space x, with t that grid timestep;
- the "Automatic" schedule is t linear from 999 to 19 over n points, sigma interpolated linearly in log sigma
  between the grid's sigmas (not the 1000 model sigmas);
- a named schedule with a range (Karras, exponential, ...) spans the grid's [sigma(19), sigma(999)].

For an ordinary (not distilled) model this is what A1111 computes too; the pictures are then rough, as LCM
sampling assumes a consistency model.
"""

from __future__ import annotations

from typing import Any

import torch

from .denoiser import Denoiser
from .k_samplers import Callback, sample_lcm
from .schedule import DiscreteSchedule, get_schedule_name

ORIGINAL_STEPS = 50    # LCM's distillation grid (A1111: original_timesteps = 50)
SIGMA_DATA = 0.5       # consistency-model boundary condition, sigma_data
TIMESTEP_SCALING = 10  # ... and its timestep scaling s (A1111: "* 10.0")


def lcm_timesteps(schedule: DiscreteSchedule, original_steps: int = ORIGINAL_STEPS) -> torch.Tensor:
    """The increasing int64 grid (k + 1) T / N - 1, k = 0 .. N - 1: 19, 39, ..., 999 for T = 1000, N = 50.

    >>> lcm_timesteps(DiscreteSchedule())[[0, 1, -1]].tolist()
    [19, 39, 999]
    """
    skip = schedule.num_timesteps // original_steps
    return torch.arange(1, original_steps + 1, dtype=torch.int64) * skip - 1 + (schedule.num_timesteps
                                                                                 - original_steps * skip)


def boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency function at timestep t (see the module docstring)."""
    st = TIMESTEP_SCALING * t
    return SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / (st**2 + SIGMA_DATA**2) ** 0.5


class LCMDenoiser:
    """A :class:`Denoiser` seen as A1111's ``LCMCompVisDenoiser``: ``f(x, sigma)`` for one float sigma.

    >>> d = LCMDenoiser(Denoiser(lambda x, t: torch.zeros_like(x), DiscreteSchedule()))
    >>> d.timestep(14.6), d.timestep(0.03)
    (999, 19)
    """

    def __init__(self, denoiser: Denoiser, original_steps: int = ORIGINAL_STEPS) -> None:
        self.inner, self.schedule = denoiser, denoiser.schedule
        self.timesteps = lcm_timesteps(self.schedule, original_steps)
        self.log_sigmas = self.schedule.log_sigmas[self.timesteps]

    def timestep(self, sigma: float) -> int:
        """The grid timestep whose sigma is nearest to ``sigma`` in log sigma (the first one on a tie)."""
        j = int(torch.argmin((self.log_sigmas - torch.tensor(float(sigma), dtype=torch.float64).log()).abs()))
        return int(self.timesteps[j])

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = self.timestep(sigma)
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x + c_out * self.inner(x, sigma, t=float(t))


def lcm_sigmas(schedule: DiscreteSchedule, n: int, kind: str = "automatic",
               original_steps: int = ORIGINAL_STEPS) -> torch.Tensor:
    """The ``n + 1`` float32 sigmas (ending in 0) of an ``n``-step A1111 LCM run with schedule ``kind``.

    "automatic" and "uniform" (A1111's Uniform is its denoiser's own schedule too): the grid index
    u = linspace(N - 1, 0, n) (t = 999 ... 19), log sigma interpolated linearly between neighbouring grid sigmas. Karras, exponential and the other schedules that take a range span the
    grid's sigmas, as A1111 hands them the LCM denoiser's sigma_min (at t = 19) and sigma_max (at t = 999).
    The other schedules A1111 computes from its denoiser's timesteps (SGM Uniform, Simple, Normal, DDIM) are
    taken here from the model's 1000 timesteps: an approximation of A1111's.

    >>> s = DiscreteSchedule()
    >>> torch.allclose(lcm_sigmas(s, 50)[:-1].double(), s.sigmas[lcm_timesteps(s)].flip(0).float().double())
    True
    """
    grid_log_sigmas = schedule.log_sigmas[lcm_timesteps(schedule, original_steps)]
    if get_schedule_name(kind) not in ("automatic", "uniform"):
        return schedule.get_sigmas(n, kind, sigma_min=float(grid_log_sigmas[0].exp()),
                                   sigma_max=float(grid_log_sigmas[-1].exp()))
    u = torch.linspace(original_steps - 1, 0, n, dtype=torch.float64)
    low, high = u.floor().long(), u.ceil().long()
    w = u - low
    sigmas = ((1 - w) * grid_log_sigmas[low] + w * grid_log_sigmas[high]).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


@torch.no_grad()
def sample_lcm_a1111(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                     generator: Any = None, callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """A1111's "LCM": :func:`~sdlite.schedulers.k_samplers.sample_lcm` on :class:`LCMDenoiser` (``eta`` unused)."""
    return sample_lcm(LCMDenoiser(denoiser), x, sigmas, generator=generator, callback=callback, eta=eta)

