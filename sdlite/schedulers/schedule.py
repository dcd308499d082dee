"""The noise schedule of Stable Diffusion: the forward process and the step schedules built on it.

Stable Diffusion was trained as a discrete DDPM (Ho et al. 2020) with T = 1000 steps and the
"linear" schedule of the original ``ldm`` code (diffusers calls it ``scaled_linear``)::

    beta_t      = linspace(sqrt(linear_start), sqrt(linear_end), T)[t] ** 2
    alphabar_t  = prod_{s <= t} (1 - beta_s)
    x_t         = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps            (DDPM eq. 4)

The same process written as "data plus Gaussian noise of standard deviation sigma" (Karras et al.
2022, "Elucidating the Design Space", Table 1, the VP column) is ``x = x_0 + sigma * eps`` with
``x = x_t / sqrt(alphabar_t)`` and ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``. The k-samplers
work in that sigma space; DDIM, PLMS and DDPM work in the x_t ("VP") space. Both spaces meet at
sigma = 0, where x is the clean latent.

Everything is computed in float64 (the ``ldm`` code builds the schedule in float64 numpy, then
stores it in float32); no buffers, no device: a schedule is a handful of small CPU tensors.

    >>> s = DiscreteSchedule()
    >>> round(s.sigma_max, 4), round(s.sigma_min, 4)
    (14.6146, 0.0292)
    >>> s.ddim_timesteps(50)[:3].tolist(), s.ddim_timesteps(50)[-1].item()
    ([981, 961, 941], 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ArgumentError, SamplerError
from .beta_dist import beta_ppf

if TYPE_CHECKING:
    from ..config import ModelConfig


@dataclass(frozen=True)
class ScheduleType:
    """A named sigma schedule, as the AUTOMATIC1111 web UI lists them (``modules/sd_schedulers.py``).

    ``id`` is what the API accepts as ``scheduler``, ``label`` what infotext writes as ``Schedule type``."""

    id: str
    label: str
    aliases: tuple[str, ...] = ()
    # Where A1111 has a rho option (Karras: 7, Polyexponential: 1); -1 = none.
    default_rho: float = -1.0


# In A1111's order. "automatic" means "the sampler's own default" (see registry.Sampler.default_schedule);
# a bare DiscreteSchedule.get_sigmas("automatic") is the model's own discrete schedule (= "uniform").
SCHEDULES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic"),
    ScheduleType("uniform", "Uniform"),
    ScheduleType("karras", "Karras", default_rho=7.0),
    ScheduleType("exponential", "Exponential"),
    ScheduleType("polyexponential", "Polyexponential", default_rho=1.0),
    ScheduleType("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal"),
    ScheduleType("align_your_steps", "Align Your Steps"),
    ScheduleType("simple", "Simple"),
    ScheduleType("normal", "Normal"),
    ScheduleType("ddim", "DDIM"),
    ScheduleType("beta", "Beta"),
)

SCHEDULE_LABELS: dict[str, str] = {s.id: s.label for s in SCHEDULES}

# Align Your Steps (Sabour et al. 2024), the published list of 11 sigmas for SD 1.5 (ComfyUI and
# diffusers run 10 steps on its first 10, then 0). A1111 uses it for every non-SDXL model: as-is, then
# 0, when steps == 11 (its check is n == len(list)), else log-linearly resampled to n levels; so 10
# steps here, as in A1111, are a resampling of the list.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)

# The Beta schedule's shape parameters: the defaults of A1111's options beta_dist_alpha / beta_dist_beta,
# which its infotext records as "Beta schedule alpha" / "Beta schedule beta".
BETA_DIST_ALPHA = 0.6
BETA_DIST_BETA = 0.6


def _schedule_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for s in SCHEDULES:
        for name in (s.id, s.label, *s.aliases):
            index[name.lower()] = s.id
    return index


_SCHEDULE_INDEX = _schedule_index()


def get_schedule_name(name: str | None) -> str:
    """The schedule id for an id, A1111 label or alias (case-insensitive); None means "automatic".

    >>> get_schedule_name("Karras"), get_schedule_name("sgm_uniform"), get_schedule_name(None)
    ('karras', 'sgm_uniform', 'automatic')
    """
    if name is None or name == "":
        return "automatic"
    key = str(name).strip().lower()
    if key not in _SCHEDULE_INDEX:
        valid = ", ".join(f"{s.id} ({s.label})" for s in SCHEDULES)
        raise SamplerError(f"unknown schedule {name!r}; valid schedules: {valid}")
    return _SCHEDULE_INDEX[key]


def schedule_label(name: str | None) -> str:
    """The A1111 label ("Karras") of a schedule id, label or alias.

    >>> schedule_label("exponential")
    'Exponential'
    """
    return SCHEDULE_LABELS[get_schedule_name(name)]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: ``n`` levels (float64, no final 0) from ``sigma_max`` down to ``sigma_min``,
    sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho; one level is ``[sigma_max]``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class DiscreteSchedule:
    """The DDPM noise schedule of a Stable Diffusion model (float64 CPU tensors).

    Attributes (all ``[T]``, index = integer timestep t):
        ``betas``, ``alphas_cumprod`` (alphabar), ``sigmas`` = sqrt((1 - alphabar) / alphabar) (increasing
        with t), ``log_sigmas``.
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> None:
        if timesteps < 2:
            raise ArgumentError(f"a schedule needs at least 2 timesteps, got {timesteps}")
        self.linear_start, self.linear_end, self.num_timesteps = float(linear_start), float(linear_end), int(timesteps)
        # ldm.modules.diffusionmodules.util.make_beta_schedule("linear"): linear in sqrt(beta).
        self.betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "DiscreteSchedule":
        """The schedule a :class:`~sdlite.config.ModelConfig` was trained with."""
        return cls(cfg.linear_start, cfg.linear_end, cfg.timesteps)

    def __repr__(self) -> str:
        return (f"DiscreteSchedule(linear_start={self.linear_start}, linear_end={self.linear_end}, "
                f"timesteps={self.num_timesteps})")

    @property
    def sigma_min(self) -> float:
        """sigma at t = 0 (the least noise the model was trained on)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """sigma at t = T - 1."""
        return float(self.sigmas[-1])

    # -- the forward process ----------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I)   (DDPM eq. 4).

        ``x0``, ``noise``: ``[B, C, H, W]``; ``t``: an int, a 0-d tensor or ``[B]`` integer timesteps.
        The result is in the VP (x_t) space, in ``x0``'s dtype."""
        t = self._integer_timesteps(t)
        a = self.alphas_cumprod[t]
        shape = (-1,) + (1,) * (x0.ndim - 1) if a.ndim == 1 else ()
        sqrt_a = a.sqrt().reshape(shape).to(x0.device, x0.dtype)
        sqrt_1ma = (1.0 - a).sqrt().reshape(shape).to(x0.device, x0.dtype)
        return sqrt_a * x0 + sqrt_1ma * noise

    def _integer_timesteps(self, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).cpu()
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ArgumentError(f"add_noise needs integer timesteps, got {t.tolist()}")
            t = t.round()
        t = t.long()
        if (t < 0).any() or (t >= self.num_timesteps).any():
            raise ArgumentError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}")
        return t

    # -- sigma <-> t ------------------------------------------------------------------------------

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The (fractional) timestep of a noise level: linear interpolation of t in log sigma
        (k-diffusion ``DiscreteSchedule.sigma_to_t`` with ``quantize=False``; never rounded).
        Sigmas outside [sigma_min, sigma_max] clamp to t = 0 or T - 1. Returns sigma's float dtype
        (float32 for a Python float)."""
        sigma = torch.as_tensor(sigma)
        out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        log_sigma = sigma.detach().to("cpu", torch.float64).log()
        # low = the last index whose log sigma is <= the query (log_sigmas is increasing).
        low = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1), right=True).reshape(log_sigma.shape) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = low.to(torch.float64) + w
        return t.to(sigma.device, out_dtype)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """The noise level of a (fractional) timestep: log sigma interpolated linearly between the
        neighbouring integer timesteps (k-diffusion ``t_to_sigma``)."""
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        tt = t.detach().to("cpu", torch.float64).clamp(0, self.num_timesteps - 1)
        low, high, w = tt.floor().long(), tt.ceil().long(), tt - tt.floor()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(t.device, out_dtype)

    # -- step schedules -----------------------------------------------------------------------------

    def get_sigmas(self, n: int, kind: str = "automatic", *, rho: float | None = None,
                   sigma_min: float | None = None, sigma_max: float | None = None,
                   beta_dist_alpha: float | None = None, beta_dist_beta: float | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n + 1`` decreasing noise levels for an ``n``-step k-sampler, ending in 0.

        ``kind`` (an id, A1111 label or alias, see :data:`SCHEDULES`):

        - ``automatic`` / ``uniform``: the model's own levels, t = linspace(T - 1, 0, n) mapped through
          :meth:`t_to_sigma` (k-diffusion ``DiscreteSchedule.get_sigmas``, A1111's default);
        - ``karras``: Karras et al. 2022 eq. 5, sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho,
          rho = 7;
        - ``exponential``: log sigma linear from log sigma_max to log sigma_min;
        - ``polyexponential``: as exponential on a ramp**rho (rho = 1 is exponential);
        - ``sgm_uniform``: t linear from t(sigma_max) to t(sigma_min) over n + 1 points, the last dropped;
        - ``normal``: t linear from t(sigma_max) to t(sigma_min) over n points;
        - ``simple``: every (T/n)-th model sigma from the top;
        - ``ddim``: the model sigmas at t = 1, 1 + T//n, ... (DDIM's uniform timesteps);
        - ``kl_optimal``: sigma = tan of a linear ramp in arctan sigma (Sabour et al. 2024); the last point,
          sigma_min in A1111, is 0 here (as in ComfyUI);
        - ``align_your_steps``: the published SD 1.5 AYS sigmas, log-linearly resampled to n;
        - ``beta``: sigma = sigma_min + u (sigma_max - sigma_min) with u the Beta(alpha, beta) quantiles of
          1 - linspace(0, 1, n) (Lee et al. 2024, "Beta Sampling is All You Need", as A1111 1.10 computes it),
          alpha = ``beta_dist_alpha``, beta = ``beta_dist_beta``, both 0.6 by default (A1111's options).

        sigma_min/sigma_max default to the model's (as A1111 uses them for karras/exponential/beta).

        >>> DiscreteSchedule().get_sigmas(4, "karras").tolist()[-1]
        0.0
        """
        if n < 1:
            raise ArgumentError(f"the number of steps must be >= 1, got {n}")
        kind = get_schedule_name(kind)
        lo = self.sigma_min if sigma_min is None else float(sigma_min)
        hi = self.sigma_max if sigma_max is None else float(sigma_max)
        f64 = torch.float64
        if kind in ("automatic", "uniform"):
            sigmas = self.t_to_sigma(torch.linspace(self.num_timesteps - 1, 0, n, dtype=f64))
        elif kind == "karras":
            sigmas = karras_sigmas(n, lo, hi, 7.0 if rho is None else float(rho))
        elif kind == "exponential":
            sigmas = torch.linspace(math.log(hi), math.log(lo), n, dtype=f64).exp()
        elif kind == "polyexponential":
            r = 1.0 if rho is None else float(rho)
            ramp = torch.linspace(1, 0, n, dtype=f64) ** r
            sigmas = (ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp()
        elif kind in ("sgm_uniform", "normal"):
            start, end = self.sigma_to_t(torch.tensor(hi, dtype=f64)), self.sigma_to_t(torch.tensor(lo, dtype=f64))
            ts = torch.linspace(float(start), float(end), n + 1, dtype=f64)[:-1] if kind == "sgm_uniform" \
                else torch.linspace(float(start), float(end), n, dtype=f64)
            sigmas = self.t_to_sigma(ts)
        elif kind == "simple":
            stride = self.num_timesteps / n
            sigmas = torch.stack([self.sigmas[-(1 + int(i * stride))] for i in range(n)])
        elif kind == "ddim":
            stride = max(self.num_timesteps // n, 1)
            sigmas = self.sigmas[1::stride].flip(0)
        elif kind == "kl_optimal":
            a_min, a_max = math.atan(lo), math.atan(hi)
            i = torch.arange(n, dtype=f64)
            # The ramp's n + 1-th point would be sigma_min itself; A1111 stops there (leaving sigma_min of noise),
            # ComfyUI replaces it by 0 as every other schedule ends. The latter is done here.
            sigmas = torch.tan(i / n * a_min + (1.0 - i / n) * a_max)
        elif kind == "beta":
            a = BETA_DIST_ALPHA if beta_dist_alpha is None else float(beta_dist_alpha)
            b = BETA_DIST_BETA if beta_dist_beta is None else float(beta_dist_beta)
            if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
                raise ArgumentError(f"the Beta schedule's beta_dist_alpha and beta_dist_beta must be positive "
                                    f"numbers (A1111's default: 0.6), got {a} and {b}")
            # A1111 maps the quantiles linearly onto [sigma_min, sigma_max], not onto timesteps as the paper and
            # ComfyUI do (A1111's dev branch switched to timesteps in PR #16926, 2025, in no release yet);
            # t = 1 has u = 1 (sigma_max first), t = 0 has u = 0 (sigma_min last, then 0). float64, as scipy.
            t = 1.0 - np.linspace(0.0, 1.0, n)
            u = torch.tensor([beta_ppf(q, a, b) for q in t.tolist()], dtype=f64)
            sigmas = lo + u * (hi - lo)
        elif kind == "align_your_steps":
            ays = torch.tensor(AYS_SD15, dtype=f64)
            if n != len(AYS_SD15):
                sigmas = _loglinear_resample(ays, n)
            else:
                sigmas = ays
        else:  # pragma: no cover - get_schedule_name only returns the ids above
            raise SamplerError(f"schedule {kind!r} has no implementation")
        return torch.cat([sigmas.to(f64), sigmas.new_zeros(1, dtype=f64)]).to(dtype)

    def ddim_timesteps(self, n: int) -> torch.Tensor:
        """The integer timesteps of an ``n``-step DDIM/PLMS/DDPM run, decreasing (int64 ``[n']``).

        The original CompVis ``make_ddim_timesteps("uniform")``: ``range(0, T, T // n) + 1``, so 50 steps
        visit 981, 961, ..., 21, 1. As in the original, when T is not a multiple of n this gives one or
        more extra steps (n = 7: 8 timesteps, 995 ... 1); n = T would give timestep T, which A1111 clips
        to T - 1 (done here too)."""
        if not 1 <= n <= self.num_timesteps:
            raise ArgumentError(f"timestep samplers take 1 to {self.num_timesteps} steps, got {n}")
        ts = torch.arange(0, self.num_timesteps, self.num_timesteps // n, dtype=torch.int64) + 1
        return ts.clamp(max=self.num_timesteps - 1).flip(0)


def _loglinear_resample(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """Resample a decreasing sigma list to ``n`` points, linearly in log sigma (A1111 ``loglinear_interp``)."""
    ys = sigmas.flip(0).log()  # increasing
    xs = torch.linspace(0, 1, len(sigmas), dtype=torch.float64)
    new_xs = torch.linspace(0, 1, n, dtype=torch.float64)
    idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    new_ys = y0 + (new_xs - x0) / (x1 - x0) * (y1 - y0)
    return new_ys.exp().flip(0)
