"""The denoiser: a network's raw eps or v output turned into what the samplers need.

The samplers never see the network. They get a :class:`Denoiser`, which wraps
``model_fn(x_in, t) -> raw output`` (the pipeline puts classifier-free guidance and the text
conditioning inside ``model_fn``) together with the :class:`DiscreteSchedule` the model was trained
with and its prediction type:

- sigma space (k-samplers): ``denoiser(x, sigma) -> x0``, the preconditioning of Karras et al. 2022,
  Table 1 (k-diffusion ``CompVisDenoiser`` / ``CompVisVDenoiser``): for an eps model its VP column; for
  a v model the c_skip and c_out of its "ours" (EDM) column with sigma_data = 1, c_out negated for v's
  sign convention::

      c_in = 1 / sqrt(sigma^2 + 1)          t = sigma_to_t(sigma)  (fractional, never rounded)
      eps model:  x0 = x - sigma * eps(c_in x, t)
      v model:    x0 = c_skip x + c_out v(c_in x, t),  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)

- VP space (DDIM, PLMS, DDPM, UniPC): ``denoiser.eps(x_t, t)`` with integer t (fractional for UniPC); a v
  model's output is turned into eps with eps = sqrt(alphabar) v + sqrt(1 - alphabar) x_t (Salimans & Ho
  2022, section 4), and ``pred_x0`` inverts DDPM eq. 4.

``model_fn`` always gets ``x_in`` in float32 (or float64 if x is) and ``t`` as a float32 ``[B]``
tensor; it may compute in half precision — its output is upcast before any update.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from ..devices import to_device
from ..errors import ArgumentError
from .schedule import DiscreteSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser:
    """``model_fn`` + schedule + prediction type.

    >>> s = DiscreteSchedule()
    >>> d = Denoiser(lambda x, t: torch.zeros_like(x), s, "eps")      # a model that predicts no noise
    >>> x = torch.ones(1, 4, 2, 2)
    >>> torch.equal(d(x, torch.tensor(3.0)), x)                        # then x0 = x
    True
    """

    def __init__(self, model_fn: ModelFn, schedule: DiscreteSchedule, prediction: Literal["eps", "v"] = "eps") -> None:
        if prediction not in ("eps", "v"):
            raise ArgumentError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.model_fn, self.schedule, self.prediction = model_fn, schedule, prediction

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r}, schedule={self.schedule!r})"

    # -- sigma space --------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float,
                 t: torch.Tensor | float | None = None) -> torch.Tensor:
        """The denoised estimate x0 of ``x = x0 + sigma * eps`` (``[B, C, H, W]``, sigma a float, 0-d or ``[B]``).

        ``t``, the time the network is told, is ``sigma_to_t(sigma)`` unless given: A1111's LCM sampler
        (:mod:`.lcm`) tells the network the nearest of its 50 distilled timesteps instead."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        sigma = self._per_batch(sigma, x.shape[0])
        t = self.schedule.sigma_to_t(sigma) if t is None else self._per_batch(t, x.shape[0])
        t = to_device(t, x.device, torch.float32)
        per_sample = self._per_sample  # float64 [B] -> [B, 1, 1, 1] in x's dtype, on x's device

        c_in = per_sample(1.0 / (sigma**2 + 1.0).sqrt(), x)
        out = self.model_fn(x * c_in, t).to(dtype)
        if self.prediction == "eps":
            return x - per_sample(sigma, x) * out
        c_skip = per_sample(1.0 / (sigma**2 + 1.0), x)
        c_out = per_sample(-sigma / (sigma**2 + 1.0).sqrt(), x)
        return c_skip * x + c_out * out

    # -- VP space -----------------------------------------------------------------------------------

    def eps(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The predicted noise of ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` at timestep(s) ``t``.

        DDIM, PLMS and DDPM pass integer timesteps; UniPC fractional ones, which reach the model unrounded.
        For a v model the conversion then reads alphabar at the integer part of t, as A1111's
        ``CompVisTimestepsVDenoiser`` does (``alphas_cumprod[t.to(int)]``)."""
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t = x_t.to(dtype)
        t = self._per_batch(t, x_t.shape[0])
        return self._as_eps(x_t, t, self.model_fn(x_t, to_device(t, x_t.device, torch.float32)).to(dtype))

    def eps_and_uncond_eps(self, x_t: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`eps` and the unconditional prediction's noise, from one network call: what the CFG++
        samplers need. A guided model function says how to get both with a ``with_uncond(x, t) ->
        (guided, unconditional)`` attribute, as the pipeline's has (:meth:`sdlite.Pipeline._model_fn`);
        for any other, unguided, function the two are the same prediction."""
        both = getattr(self.model_fn, "with_uncond", None)
        if both is None:
            e = self.eps(x_t, t)
            return e, e
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t = x_t.to(dtype)
        t = self._per_batch(t, x_t.shape[0])
        out, out_uncond = both(x_t, to_device(t, x_t.device, torch.float32))
        return self._as_eps(x_t, t, out.to(dtype)), self._as_eps(x_t, t, out_uncond.to(dtype))

    def _as_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The network's output at ``x_t``, time ``t`` (float64 ``[B]``) as predicted noise."""
        if self.prediction == "eps":
            return out
        a = self.schedule.alphas_cumprod[t.floor().long()]  # float64; square roots taken before the cast
        return self._per_sample(a.sqrt(), x_t) * out + self._per_sample((1.0 - a).sqrt(), x_t) * x_t

    def pred_x0(self, x_t: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), DDPM eq. 4 solved for x0 (DDIM eq. 12's "predicted x0")."""
        a = self.schedule.alphas_cumprod[self._per_batch(t, x_t.shape[0]).round().long()]
        return (x_t - self._per_sample((1.0 - a).sqrt(), x_t) * eps) / self._per_sample(a.sqrt(), x_t)

    @staticmethod
    def _per_batch(v: float | torch.Tensor, batch: int) -> torch.Tensor:
        """A float, 0-d or ``[B]`` sigma or timestep as a float64 ``[B]`` on the CPU (where the schedule lives)."""
        v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
        return v.expand(batch) if v.ndim == 0 else v.reshape(batch)

    @staticmethod
    def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return to_device(v.reshape(-1, *([1] * (x.ndim - 1))), x.device, torch.promote_types(x.dtype, torch.float32))
