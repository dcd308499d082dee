"""Noise schedule, denoiser and samplers. They know nothing of networks: they get a function.

    >>> import torch
    >>> from sdlite.schedulers import DiscreteSchedule, Denoiser, get_sampler
    >>> schedule = DiscreteSchedule()                                 # SD's DDPM schedule, T = 1000
    >>> denoiser = Denoiser(lambda x, t: 0.1 * x, schedule, "eps")    # model_fn(x_in, t) -> eps
    >>> sampler = get_sampler("DPM++ 2M Karras")
    >>> levels = sampler.levels(schedule, 10)                         # 11 sigmas, Karras, ending in 0
    >>> sampler.sample(denoiser, torch.randn(1, 4, 8, 8), levels).shape
    torch.Size([1, 4, 8, 8])

- :mod:`.schedule`: :class:`DiscreteSchedule` (the forward process ``add_noise``, sigma ↔ t, the step
  schedules ``get_sigmas`` and ``ddim_timesteps``) and the A1111 schedule names;
- :mod:`.beta_dist`: the Beta distribution's CDF and quantile function (for the "Beta" schedule, without scipy);
- :mod:`.denoiser`: :class:`Denoiser`, eps/v output → x0 (sigma space) or eps (VP space);
- :mod:`.k_samplers`: Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2M / 2M SDE / 3M SDE / 2S a / SDE, LCM's step;
- :mod:`.dpm_solver`: DPM fast and DPM adaptive (DPM-Solver, Lu et al. 2022) between two noise levels;
- :mod:`.restart`: Restart sampling (Heun with restarts), as A1111 runs it;
- :mod:`.lcm`: A1111's LCM sampler (the consistency wrapper and LCM's 50-timestep grid);
- :mod:`.ddim`, :mod:`.ddpm`: DDIM (and DDIM CFG++), PLMS, DDPM in the VP space with integer timesteps;
- :mod:`.unipc`: UniPC in the VP space, on A1111's time-uniform fractional timesteps;
- :mod:`.registry`: :class:`Sampler`, :data:`SAMPLERS`, :func:`get_sampler`, :func:`parse_sampler_and_schedule`,
  and A1111's sampler settings (:data:`SAMPLER_SETTINGS`: UniPC's options, the Beta schedule's alpha and beta).
"""

from .ddim import sample_ddim, sample_ddim_cfgpp, sample_plms
from .ddpm import sample_ddpm
from .denoiser import Denoiser
from .dpm_solver import dpm_solver_adaptive, dpm_solver_fast, sample_dpm_adaptive, sample_dpm_fast
from .k_samplers import (
    get_ancestral_step,
    heun_step,
    lms_coefficient,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
)
from .lcm import LCMDenoiser, lcm_sigmas, sample_lcm_a1111
from .registry import (
    SAMPLER_SETTINGS,
    SAMPLERS,
    Sampler,
    check_sampler_settings,
    get_sampler,
    parse_sampler_and_schedule,
)
from .restart import restart_plan, sample_restart
from .schedule import SCHEDULE_LABELS, SCHEDULES, DiscreteSchedule, ScheduleType, get_schedule_name, schedule_label
from .unipc import sample_unipc

__all__ = [
    "DiscreteSchedule", "ScheduleType", "SCHEDULES", "SCHEDULE_LABELS", "get_schedule_name", "schedule_label",
    "Denoiser",
    "Sampler", "SAMPLERS", "get_sampler", "parse_sampler_and_schedule", "SAMPLER_SETTINGS", "check_sampler_settings",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde",
    "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_ddim", "sample_ddim_cfgpp", "sample_plms", "sample_ddpm",
    "sample_unipc", "sample_lcm", "sample_lcm_a1111", "LCMDenoiser", "lcm_sigmas", "sample_restart", "restart_plan",
    "sample_dpm_fast", "sample_dpm_adaptive", "dpm_solver_fast", "dpm_solver_adaptive",
    "get_ancestral_step", "heun_step", "lms_coefficient",
]
