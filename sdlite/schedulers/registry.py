"""The sampler registry: names (ids, AUTOMATIC1111 labels, aliases) → :class:`Sampler`.

A :class:`Sampler` bundles a sampling loop with what the web UI knows about it (its default schedule,
whether it drops the penultimate sigma, its default eta) and the two operations a pipeline needs:
``levels`` (the sigmas or timesteps of a run, img2img included) and ``sample`` (unit noise → latent).

    >>> s = get_sampler("DPM++ 2M")
    >>> s.id, s.family, s.default_schedule
    ('dpmpp_2m', 'k', 'karras')
    >>> sampler, schedule = parse_sampler_and_schedule("Euler a Karras")     # an A1111 < 1.9 name
    >>> sampler.label, schedule
    ('Euler a', 'karras')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

from ..errors import ArgumentError, SamplerError
from . import ddim, ddpm, dpm_solver, k_samplers as k, lcm, restart, unipc
from .denoiser import Denoiser
from .schedule import SCHEDULES, DiscreteSchedule, get_schedule_name

SamplerFn = Callable[..., torch.Tensor]

# A1111's settings that shape one sampler or schedule (its Settings → Sampler parameters, and
# ``override_settings`` in its API), by name: (the sampler or schedule id they apply to, the keyword of
# sdlite's function, A1111's default). Runs with any other sampler or schedule ignore them, as A1111 does.
SAMPLER_SETTINGS: dict[str, tuple[str, str | None, Any]] = {
    "uni_pc_variant": ("unipc", "variant", "bh1"),
    "uni_pc_order": ("unipc", "order", 3),
    "uni_pc_lower_order_final": ("unipc", "lower_order_final", True),
    "uni_pc_skip_type": ("unipc", None, "time_uniform"),  # the grid of its levels (unipc.unipc_time_grid)
    "beta_dist_alpha": ("beta", "beta_dist_alpha", 0.6),
    "beta_dist_beta": ("beta", "beta_dist_beta", 0.6),
}


def check_sampler_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` (names of :data:`SAMPLER_SETTINGS` → values), checked: an unknown name or a value
    sdlite cannot run is an :class:`~sdlite.errors.ArgumentError` that says what is allowed.

    >>> check_sampler_settings({"uni_pc_order": 2, "beta_dist_alpha": 0.5})
    {'uni_pc_order': 2, 'beta_dist_alpha': 0.5}
    """
    out: dict[str, Any] = {}
    for name, value in (settings or {}).items():
        if name not in SAMPLER_SETTINGS:
            raise ArgumentError(f"unknown sampler setting {name!r}; the settings are "
                                f"{', '.join(SAMPLER_SETTINGS)}")
        if name == "uni_pc_variant" and value not in unipc.UNIPC_VARIANTS:
            raise ArgumentError(f"uni_pc_variant must be one of {', '.join(unipc.UNIPC_VARIANTS)}, got {value!r}")
        if name == "uni_pc_order" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ArgumentError(f"uni_pc_order must be an integer >= 1, got {value!r}")
        if name == "uni_pc_lower_order_final" and not isinstance(value, bool):
            raise ArgumentError(f"uni_pc_lower_order_final must be true or false, got {value!r}")
        if name == "uni_pc_skip_type" and value not in unipc.UNIPC_SKIP_TYPES:
            raise ArgumentError(f"uni_pc_skip_type must be one of {', '.join(unipc.UNIPC_SKIP_TYPES)}, "
                                f"got {value!r}")
        if name.startswith("beta_dist_"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ArgumentError(f"{name} must be a positive number (A1111's default: 0.6), got {value!r}")
            value = float(value)
        out[name] = value
    return out


def _settings_for(target: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments ``settings`` (checked here) give the sampler or schedule ``target``."""
    return {SAMPLER_SETTINGS[name][1]: value for name, value in check_sampler_settings(settings).items()
            if SAMPLER_SETTINGS[name][0] == target and SAMPLER_SETTINGS[name][1] is not None}


@dataclass(frozen=True)
class Sampler:
    """One sampler. ``fn(denoiser, x, levels, *, generator, callback, eta) -> x``.

    ``family``: ``"k"`` works on sigmas (``levels`` = ``[n + 1]`` decreasing sigmas ending in 0);
    ``"timestep"`` on integer timesteps in the VP space (``levels`` = ``[n]`` decreasing timesteps; UniPC's
    are fractional).
    ``default_schedule`` is what A1111's "Automatic" schedule means for this sampler."""

    id: str
    label: str
    fn: SamplerFn = field(repr=False, compare=False)
    family: Literal["k", "timestep"] = "k"
    aliases: tuple[str, ...] = ()
    default_schedule: str = "automatic"
    default_eta: float = 1.0
    stochastic: bool = False           # draws noise from the generator while sampling
    uses_eta: bool = False             # eta scales the noise its steps add (A1111 records a non-default eta)
    max_eta: float = math.inf          # DDIM's eq. 16 has no step for eta > 1 (see check_eta)
    eta_key: str = "Eta"               # the infotext key of a non-default eta (A1111's DDIM samplers: "Eta DDIM")
    second_order: bool = False         # two network calls per step
    discard_penultimate: bool = False  # A1111 "discard_next_to_last_sigma": steps + 1 sigmas, the second last dropped
    time_uniform: bool = False         # timestep family, on A1111's UniPC grid instead of DDIM's timesteps
    endpoints_only: bool = False       # A1111 passes only sigma_max, sigma_min, n (DPM fast/adaptive), see levels
    # CFG++ (DDIM CFG++): the model function also gives the unconditional prediction, and the guidance scale
    # is divided by 12.5 as A1111 does (model_guidance_scale).
    cfg_pp: bool = False
    a1111_options: tuple[tuple[str, Any], ...] = ()  # the "options" of A1111's /sdapi/v1/samplers
    # The sigmas of a run, (schedule, n, schedule id) -> [n + 1], where they are not the model's: LCM's grid.
    sigmas_fn: Callable[[DiscreteSchedule, int, str], torch.Tensor] | None = field(default=None, repr=False,
                                                                                  compare=False)
    # The number of steps (callbacks) of a run over n levels' worth of steps, where the sampler sets its own:
    # DPM fast makes floor(n / 3) + 1 steps from n network calls; DPM adaptive decides as it goes (None).
    steps_fn: Callable[[int], int | None] | None = field(default=None, repr=False, compare=False)

    def model_guidance_scale(self, guidance_scale: float) -> float:
        """The scale the model function guides with, given the user's CFG scale: the same, or for
        CFG++ that scale divided by 12.5, as A1111 does (its CFG scales become CFG++'s lambda in [0, 1])."""
        return guidance_scale / 12.5 if self.cfg_pp else guidance_scale

    def step_count(self, levels: torch.Tensor) -> int | None:
        """How many steps (so callbacks) a run over ``levels`` makes: a progress bar's total. None where
        the sampler chooses its steps while it runs (DPM adaptive)."""
        n = len(levels) - 1 if self.family == "k" else len(levels)
        return n if self.steps_fn is None else self.steps_fn(n)

    @property
    def uses_ensd(self) -> bool:
        """Whether A1111 records its "Eta noise seed delta" (ENSD) for this sampler: the ancestral ones,
        whose noise then comes from streams seeded with seed + ENSD (:func:`sdlite.seeds.random_streams`)."""
        return bool(dict(self.a1111_options).get("uses_ensd", False))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this sampler answers to: id, label, aliases."""
        return (self.id, self.label, *self.aliases)

    def levels(self, schedule: DiscreteSchedule, steps: int, schedule_name: str | None = None,
               strength: float = 1.0, settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The sigmas (k family, ``[n + 1]`` float32) or timesteps (timestep family, ``[n]`` int64) a run visits.

        ``schedule_name`` None or "automatic" uses :attr:`default_schedule`; timestep samplers always use the
        DDIM spacing (A1111 ignores the schedule type for them too; an unknown name still raises).
        ``settings`` (:data:`SAMPLER_SETTINGS`) shape the Beta schedule.
        ``strength`` < 1 (img2img) keeps only the last part, as A1111 does with
        ``t_enc = int(min(strength, 0.999) * steps)``: k samplers ``sigmas[steps - t_enc - 1:]`` (t_enc + 1
        steps), timestep samplers the last ``max(t_enc, 1)`` timesteps.

        :attr:`time_uniform` (UniPC): A1111 hands UniPC only the *number* of those DDIM timesteps, n, and its
        start (txt2img: T - 1; img2img: the highest timestep kept); UniPC steps from there to 0, by default
        time-uniformly. The levels are then the n fractional step starts, float64: linspace(start, 0,
        n + 1)[:-1] (the ``uni_pc_skip_type`` setting picks another spacing: :func:`unipc.unipc_time_grid`).

        :attr:`endpoints_only` (DPM fast, DPM adaptive): the sampler uses only the first and the last nonzero
        level and the count. A1111's txt2img passes them the model's sigma_max and sigma_min and n = steps
        whatever the schedule type, so txt2img gives the model's own ("uniform") levels, which have exactly
        those ends; img2img keeps the chosen schedule, whose cut ends A1111 passes.

        >>> get_sampler("Euler").levels(DiscreteSchedule(), 20, strength=0.5).shape
        torch.Size([12])
        """
        if int(steps) < 1:
            raise ArgumentError(f"steps must be >= 1, got {steps}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ArgumentError(f"the denoising strength must lie in [0, 1], got {strength}")
        steps, strength = int(steps), float(strength)
        name = get_schedule_name(schedule_name)
        t_enc = int(min(strength, 0.999) * steps)
        if self.family == "timestep":
            ts = schedule.ddim_timesteps(steps)
            ts = ts if strength >= 1.0 else ts[-max(t_enc, 1):]
            if not self.time_uniform:
                return ts
            start = float(schedule.num_timesteps - 1) if strength >= 1.0 else float(ts[0])
            skip_type = check_sampler_settings(settings).get("uni_pc_skip_type", "time_uniform")
            return unipc.unipc_time_grid(schedule, start, len(ts), skip_type)
        if name == "automatic":
            name = self.default_schedule
        if self.endpoints_only and strength >= 1.0:
            name = "uniform"
        n = steps + 1 if self.discard_penultimate else steps
        sigmas = (schedule.get_sigmas(n, name, **_settings_for(name, settings)) if self.sigmas_fn is None
                  else self.sigmas_fn(schedule, n, name))
        if self.discard_penultimate:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas if strength >= 1.0 else sigmas[steps - t_enc - 1:]

    def check_eta(self, eta: float | None) -> float:
        """The eta a run uses (None = :attr:`default_eta`), or :class:`ArgumentError` if this sampler has no
        step for it: below 0, or above 1 for DDIM, whose noise of std eta x the DDPM posterior's would then
        exceed the noise the step may add (the square root of a negative number: NaN in CompVis' and
        A1111's code). The ancestral k samplers take any eta: past 1 a large step's noise is all of the
        next level's."""
        eta = self.default_eta if eta is None else float(eta)
        if not 0.0 <= eta <= self.max_eta:  # also NaN
            top = "" if self.max_eta == math.inf else f" and ≤ {self.max_eta:g}"
            raise ArgumentError(f"eta must be ≥ 0{top} for {self.label} (0: no added noise), got {eta}")
        return eta

    def sample(self, denoiser: Denoiser, noise: torch.Tensor, levels: torch.Tensor, *, init: torch.Tensor | None = None,
               generator: torch.Generator | None = None, callback: k.Callback | None = None,
               eta: float | None = None, settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Run the sampler from unit-variance ``noise`` (``[B, C, H, W]``) and return the final latent.

        k family: x = init + noise * sigmas[0] (init = 0 for txt2img). Timestep family: x = noise, or
        ``add_noise(init, noise, levels[0])`` for img2img (CompVis/A1111 noise the init one stride higher,
        at the timestep *above* the first visited one; here the init is noised at the level the run starts
        from, consistently with the k samplers). ``eta`` None = :attr:`default_eta`. ``settings``
        (:data:`SAMPLER_SETTINGS`): those of this sampler go to its function (UniPC's)."""
        eta = self.check_eta(eta)
        noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
        if self.family == "k":
            x = noise * float(levels[0])
            if init is not None:
                x = init.to(x.device, x.dtype) + x
        else:
            x = noise if init is None else denoiser.schedule.add_noise(init.to(noise.device, noise.dtype), noise,
                                                                       int(levels[0]))
        return self.fn(denoiser, x, levels, generator=generator, callback=callback, eta=eta,
                       **_settings_for(self.id, settings))


# In the order of the A1111 sampler list (modules/sd_samplers_kdiffusion.py, the timestep samplers, then LCM).
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("dpmpp_2m", "DPM++ 2M", k.sample_dpmpp_2m, aliases=("k_dpmpp_2m",), default_schedule="karras",
            a1111_options=(("scheduler", "karras"),)),
    Sampler("dpmpp_sde", "DPM++ SDE", k.sample_dpmpp_sde, aliases=("k_dpmpp_sde",), default_schedule="karras",
            stochastic=True, uses_eta=True, second_order=True,
            a1111_options=(("scheduler", "karras"), ("second_order", True), ("brownian_noise", True))),
    Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", k.sample_dpmpp_2m_sde, aliases=("k_dpmpp_2m_sde",),
            default_schedule="exponential", stochastic=True, uses_eta=True,
            a1111_options=(("scheduler", "exponential"), ("brownian_noise", True))),
    Sampler("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", k.sample_dpmpp_2m_sde_heun, aliases=("k_dpmpp_2m_sde_heun",),
            default_schedule="exponential", stochastic=True, uses_eta=True,
            a1111_options=(("scheduler", "exponential"), ("brownian_noise", True), ("solver_type", "heun"))),
    Sampler("dpmpp_2s_a", "DPM++ 2S a", k.sample_dpmpp_2s_ancestral, aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral"),
            default_schedule="karras", stochastic=True, uses_eta=True, second_order=True,
            a1111_options=(("scheduler", "karras"), ("uses_ensd", True), ("second_order", True))),
    Sampler("dpmpp_3m_sde", "DPM++ 3M SDE", k.sample_dpmpp_3m_sde, aliases=("k_dpmpp_3m_sde",),
            default_schedule="exponential", stochastic=True, uses_eta=True, discard_penultimate=True,
            a1111_options=(("scheduler", "exponential"), ("discard_next_to_last_sigma", True),
                           ("brownian_noise", True))),
    Sampler("euler_a", "Euler a", k.sample_euler_ancestral,
            aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral"), stochastic=True, uses_eta=True,
            a1111_options=(("uses_ensd", True),)),
    Sampler("euler", "Euler", k.sample_euler, aliases=("k_euler",)),
    Sampler("lms", "LMS", k.sample_lms, aliases=("k_lms",)),
    Sampler("heun", "Heun", k.sample_heun, aliases=("k_heun",), second_order=True,
            a1111_options=(("second_order", True),)),
    Sampler("dpm2", "DPM2", k.sample_dpm_2, aliases=("k_dpm_2", "dpm_2"), default_schedule="karras",
            second_order=True, discard_penultimate=True,
            a1111_options=(("scheduler", "karras"), ("discard_next_to_last_sigma", True), ("second_order", True))),
    Sampler("dpm2_a", "DPM2 a", k.sample_dpm_2_ancestral, aliases=("k_dpm_2_a", "dpm_2_ancestral"),
            default_schedule="karras", stochastic=True, uses_eta=True, second_order=True, discard_penultimate=True,
            a1111_options=(("scheduler", "karras"), ("discard_next_to_last_sigma", True), ("uses_ensd", True),
                           ("second_order", True))),
    Sampler("dpm_fast", "DPM fast", dpm_solver.sample_dpm_fast, aliases=("k_dpm_fast",), stochastic=True,
            uses_eta=True, endpoints_only=True, a1111_options=(("uses_ensd", True),),
            steps_fn=lambda n: len(dpm_solver.fast_orders(n))),
    Sampler("dpm_adaptive", "DPM adaptive", dpm_solver.sample_dpm_adaptive, aliases=("k_dpm_ad",), stochastic=True,
            uses_eta=True, endpoints_only=True, a1111_options=(("uses_ensd", True),), steps_fn=lambda n: None),
    Sampler("restart", "Restart", restart.sample_restart, default_schedule="karras",
            stochastic=True, second_order=True, a1111_options=(("scheduler", "karras"), ("second_order", True))),
    Sampler("ddim", "DDIM", ddim.sample_ddim, family="timestep", default_eta=0.0, uses_eta=True, max_eta=1.0,
            eta_key="Eta DDIM"),
    Sampler("ddim_cfgpp", "DDIM CFG++", ddim.sample_ddim_cfgpp, family="timestep", default_eta=0.0, uses_eta=True,
            max_eta=1.0, eta_key="Eta DDIM",
            cfg_pp=True),
    Sampler("plms", "PLMS", ddim.sample_plms, family="timestep", default_eta=0.0),
    Sampler("unipc", "UniPC", unipc.sample_unipc, family="timestep", default_eta=0.0, time_uniform=True),
    Sampler("lcm", "LCM", lcm.sample_lcm_a1111, aliases=("k_lcm",), stochastic=True, sigmas_fn=lcm.lcm_sigmas),
    # Not in A1111; the original ancestral sampler of the DDPM paper, on DDIM's strided timesteps.
    Sampler("ddpm", "DDPM", ddpm.sample_ddpm, family="timestep", stochastic=True),
)


def _sampler_index() -> dict[str, Sampler]:
    index: dict[str, Sampler] = {}
    for s in SAMPLERS:
        for name in s.names:
            key = name.lower()
            if key in index and index[key] is not s:  # pragma: no cover - guarded by a test
                raise RuntimeError(f"sampler name {name!r} is used twice")
            index[key] = s
    return index


_SAMPLER_INDEX = _sampler_index()


def _unknown(name: object) -> SamplerError:
    valid = ", ".join(f"{s.label!r} ({s.id})" for s in SAMPLERS)
    return SamplerError(f"unknown sampler {name!r}; valid samplers: {valid}. "
                        "A schedule may be appended as in A1111 < 1.9, e.g. 'DPM++ 2M Karras'.")


def get_sampler(name: str) -> Sampler:
    """The sampler for an id, A1111 label, alias (case-insensitive) or legacy "<label> <schedule>" name.

    >>> get_sampler("k_euler_a").label, get_sampler("DPM++ 2M Karras").id
    ('Euler a', 'dpmpp_2m')
    """
    return parse_sampler_and_schedule(name)[0]


def parse_sampler_and_schedule(name: str, schedule: str | None = None) -> tuple[Sampler, str]:
    """(sampler, schedule id) for a sampler name and an optional schedule name.

    Like A1111's ``get_sampler_and_scheduler``: a schedule label or id at the end of the sampler name
    ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential") is split off and wins over ``schedule``. Without any
    schedule the result is "automatic" (the sampler's :attr:`Sampler.default_schedule`). Unknown names raise
    :class:`~sdlite.errors.SamplerError` listing the valid ones.

    >>> parse_sampler_and_schedule("DPM++ 2M SDE Exponential")[1]
    'exponential'
    >>> parse_sampler_and_schedule("euler", "Karras")[1]
    'karras'
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown(name)
    key = name.strip().lower()
    if key in _SAMPLER_INDEX:
        return _SAMPLER_INDEX[key], get_schedule_name(schedule)
    for sched in SCHEDULES:
        for option in (sched.label, sched.id, *sched.aliases):
            suffix = " " + option.lower()
            if key.endswith(suffix) and key[: -len(suffix)].strip() in _SAMPLER_INDEX:
                return _SAMPLER_INDEX[key[: -len(suffix)].strip()], sched.id
    raise _unknown(name)
