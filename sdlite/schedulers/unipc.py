"""UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv:2302.04867), multistep, in the data-prediction (x0) form, as the AUTOMATIC1111 web UI
runs it (its "UniPC" sampler, with its default options: variant bh1, order 3, lower order final, time-uniform
skip type; the time-quadratic and logSNR skip types are :func:`unipc_time_grid`'s).

Signature, as the other timestep samplers (:mod:`sdlite.schedulers.ddim`)::

    fn(denoiser, x, timesteps, *, generator=None, callback=None, eta=0.0, order=3, variant="bh1",
       lower_order_final=True) -> x

``x`` is x_t = alpha_t x0 + sigma_t eps at ``timesteps[0]``; ``timesteps`` are the decreasing model times each
step starts from, fractional in general (:meth:`Sampler.levels` gives A1111's grid: time-uniform from T - 1, or
for img2img from the highest DDIM timestep kept, down to 0, with as many steps as DDIM has timesteps); the
last step ends at t = 0, as DDIM's does (x at alphabar_0, not the clean x0). ``eta`` and ``generator`` are
unused: UniPC is deterministic. ``callback(i, t_i, x, denoised)`` after step i, where ``denoised`` is the newest
x0 estimate (the model's, at the point the step reached; after the last step, which calls no model, the result
itself); returning exactly ``False`` stops.

The noise schedule between integer timesteps is DPM-Solver's discrete VP schedule, which A1111's UniPC uses:
log alpha_t = ½ log alphabar is linear in t between the integers. The network gets the fractional t unrounded.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import ArgumentError
from .denoiser import Denoiser
from .k_samplers import Callback, _stopped
from .schedule import DiscreteSchedule


def log_alpha(schedule: DiscreteSchedule, t: float) -> float:
    """log alpha_t = ½ log alphabar_t at a fractional model time t, linear between integer timesteps.

    This is the ``NoiseScheduleVP("discrete")`` of DPM-Solver and UniPC, whose continuous time
    (n + 1) / N is A1111's model time n / 1000 shifted by 1/N; k-diffusion interpolates log sigma instead.

    >>> s = DiscreteSchedule()
    >>> round(log_alpha(s, 10.5), 12) == round(0.25 * math.log(s.alphas_cumprod[10] * s.alphas_cumprod[11]), 12)
    True
    """
    half_log_abar = 0.5 * torch.log(schedule.alphas_cumprod)
    t = min(max(float(t), 0.0), schedule.num_timesteps - 1.0)
    lo = min(int(math.floor(t)), schedule.num_timesteps - 2)
    w = t - lo
    return (1.0 - w) * half_log_abar[lo].item() + w * half_log_abar[lo + 1].item()


# A1111's "UniPC variant" options: B(h) = hh or e^hh - 1 ("bh1", "bh2"; :func:`unipc_coefficients`), or the
# UniPC authors' Taylor-form coefficients ("vary_coeff"; :func:`vary_coeff_coefficients`).
UNIPC_VARIANTS = ("bh1", "bh2", "vary_coeff")


def _h_phis(p: int, hh: float) -> list[float]:
    """hh phi_{k+1}(hh) for k = 1 .. p, with phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z
    (computed by that recurrence, as the UniPC authors' code does).

    >>> [round(v, 6) for v in _h_phis(2, -0.1)]   # -> hh / 2, hh / 6 as hh -> 0
    [-0.048374, -0.016258]
    """
    out, phi = [], math.expm1(hh) / hh  # phi_1(hh)
    for k in range(1, p + 1):
        phi = (phi - 1.0 / math.factorial(k)) / hh  # phi_{k+1}(hh)
        out.append(hh * phi)
    return out


def unipc_coefficients(p: int, hh: float, variant: Literal["bh1", "bh2"]) -> tuple[float, list[float]]:
    """B(h) and the right-hand side g_p(h) / B(h) of the order conditions R_p(h) a = g_p(h) / B(h) of UniC-p
    (the paper's Section 3; UniP-p uses the first p - 1 of them).

    ``hh`` = -h, the step in -lambda (the data-prediction form). g_k = hh phi_{k+1}(hh) k! for k = 1 .. p
    (:func:`_h_phis`); R_p[k][m] = r_m^k (k = 0 .. p - 1) over r_m = (lambda_{s_m} - lambda_{s_0}) / h of the
    earlier points and r_p = 1 (see :func:`sample_unipc`). B(h) = hh ("bh1") or e^hh - 1 ("bh2").

    >>> B, b = unipc_coefficients(1, -0.1, "bh1")
    >>> B, round(b[0], 6)                      # hh phi_2(hh) / hh, -> 1/2 as h -> 0
    (-0.1, 0.483742)
    """
    if variant not in ("bh1", "bh2"):
        raise ArgumentError(f"B(h) variant must be 'bh1' or 'bh2', got {variant!r}")
    B = hh if variant == "bh1" else math.expm1(hh)
    return B, [g * math.factorial(k) / B for k, g in enumerate(_h_phis(p, hh), start=1)]


def vary_coeff_coefficients(rs: list[float], hh: float) -> tuple[list[float], list[float]]:
    """The weights a^P, a^C of the differences D_m in the "vary_coeff" variant, as A1111 (the UniPC authors'
    ``multistep_uni_pc_vary_update``) computes them; B(h) = 1 in :func:`sample_unipc`'s update.

    The Taylor form: with K = len(rs) + 1 points (r_K = 1, the new one) and C[m][k] = r_m^k / (k + 1)!, the
    differences are D = C u + ..., u_k = h^(k+1) m^(k+1) (the (k+1)-th lambda-derivative of the data
    prediction), and the exponential integrator adds -alpha_t sum_k g_k u_k, g_k = hh phi_{k+2}(hh). So:

    - UniP: u = C_P^-1 D over the K - 1 earlier points, a^P = C_P^-T g[:K-1]. This is the solved
      order condition of "bh1"/"bh2" times B(h) (those differ only in their fixed 1/2 for UniP-2 and UniC-1).
    - UniC, **as A1111 runs it, not as the Taylor form gives it**: with A = C^-1 over all K points, A1111 sums
      g_k A[k][m] over k < K - 1 for the earlier points (dropping row K - 1) and weights the new point's
      difference by g_{K-1} A[max(K - 2, 0)][K - 1] alone. For K = 1 that is the Taylor form; for K >= 2 it is
      not, and the step is then only first-order accurate (``tests/test_unipc.py`` measures the order). sdlite
      keeps A1111's arithmetic so that its "vary_coeff" images match A1111's.

    >>> a_p, a_c = vary_coeff_coefficients([], -0.1)     # K = 1: no predictor term; a^C = hh phi_2(hh)
    >>> a_p, [round(a, 6) for a in a_c]
    ([], [-0.048374])
    """
    K = len(rs) + 1
    g = _h_phis(K, hh)  # g_k = hh phi_{k+2}(hh), k = 0 .. K - 1
    f64 = torch.float64
    C = torch.tensor([[r**k / math.factorial(k + 1) for k in range(K)] for r in rs + [1.0]], dtype=f64)
    gt = torch.tensor(g, dtype=f64)
    a_p = (gt[:K - 1] @ torch.linalg.inv(C[:-1, :-1])).tolist() if K > 1 else []
    A = torch.linalg.inv(C)
    a_c = (gt[:K - 1] @ A[:K - 1, :K - 1]).tolist() + [g[K - 1] * A[max(K - 2, 0), K - 1].item()]
    return a_p, a_c


def _solve(rs: list[float], b: list[float]) -> list[float]:
    """a with sum_m rs[m]^k a[m] = b[k], k = 0 .. len(rs) - 1 (a Vandermonde system, at most 3 x 3)."""
    R = torch.tensor([[r**k for r in rs] for k in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


def unipc_time_grid(schedule: DiscreteSchedule, start: float, n: int, skip_type: str = "time_uniform") -> torch.Tensor:
    """The ``n`` model times a UniPC run steps from, float64, decreasing from ``start`` (the next, last
    point is 0), spaced as the UniPC authors' ``get_time_steps`` (A1111's "UniPC skip type" option) spaces
    them in DPM-Solver's continuous time tau = t / 1000 + 1/1000, from tau_T = start / 1000 + 1/1000 to
    tau_0 = 1/1000:

    - ``time_uniform``: tau uniform (A1111's default), i.e. the model time t uniform;
    - ``time_quadratic``: sqrt(tau) uniform;
    - ``logSNR``: lambda = log(alpha_t / sigma_t) uniform, t found by inverting the piecewise-linear
      log alpha_t of :func:`log_alpha`.

    >>> unipc_time_grid(DiscreteSchedule(), 999.0, 4).tolist()
    [999.0, 749.25, 499.5, 249.75]
    """
    if skip_type not in UNIPC_SKIP_TYPES:
        raise ArgumentError(f"UniPC skip type must be one of {', '.join(UNIPC_SKIP_TYPES)}, got {skip_type!r}")
    f64 = torch.float64
    if skip_type == "time_uniform":
        return torch.linspace(start, 0.0, n + 1, dtype=f64)[:-1]
    if skip_type == "time_quadratic":
        tau_t, tau_0 = start / 1000 + 1e-3, 1e-3
        tau = torch.linspace(math.sqrt(tau_t), math.sqrt(tau_0), n + 1, dtype=f64) ** 2
        return ((tau - 1e-3) * 1000)[:-1].clamp_min(0.0)

    def lam(t: float) -> float:
        la = log_alpha(schedule, t)
        return la - 0.5 * math.log(-math.expm1(2.0 * la))  # log alpha - log sigma, sigma^2 = 1 - alpha^2

    lams = torch.linspace(lam(start), lam(0.0), n + 1, dtype=f64)[:-1]
    log_alphas = -0.5 * torch.logaddexp(torch.zeros_like(lams), -2.0 * lams)  # alpha^2 = sigmoid(2 lambda)
    table = (0.5 * torch.log(schedule.alphas_cumprod.to(f64))).flip(0)  # increasing in log alpha
    k = torch.searchsorted(table, log_alphas).clamp(1, len(table) - 1)  # table[k - 1] <= v <= table[k]
    lo, hi = table[k - 1], table[k]
    t_hi = (len(table) - 1 - k).to(f64)  # the model time of table[k] (flipped); table[k - 1] is at t_hi + 1
    return (t_hi + (hi - log_alphas) / (hi - lo)).clamp(0.0, start)


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, *,
                 generator: torch.Generator | None = None, callback: Callback | None = None, eta: float = 0.0,
                 order: int = 3, variant: Literal["bh1", "bh2", "vary_coeff"] = "bh1",
                 lower_order_final: bool = True) -> torch.Tensor:
    """UniPC-p, multistep, data prediction m = x0(x_t, t), in lambda = log(alpha_t / sigma_t). With
    h = lambda_{t_i} - lambda_{t_{i-1}}, hh = -h, D_m = (m_{s_m} - m_{t_{i-1}}) / r_m over the previous points
    s_m, and the coefficients a of :func:`unipc_coefficients`, step i is (the paper's Section 3, in the
    data-prediction form)::

        x_1     = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^hh - 1) m_{t_{i-1}}   (DDIM / DPM-Solver-1)
        UniP-p: x~_{t_i} = x_1 - alpha_{t_i} B(h) sum_{m < p} a^P_m D_m
        UniC-p: x_{t_i}  = x_1 - alpha_{t_i} B(h) (sum_{m < p} a^C_m D_m + a^C_p (m(x~_{t_i}, t_i) - m_{t_{i-1}}))

    One model call per step: the corrector's m(x~_{t_i}, t_i), at the *predicted* point, is also the history
    value the next step uses (the paper's key to a free corrector). As A1111 (the UniPC authors' code) does:

    - the first steps are warm-up steps of order 1, 2, ..., order - 1 (too few previous points), p = i;
    - ``lower_order_final``: the steps after those lower the order again, p = min(order, n + 1 - i), so the
      last step is a first-order one (with an order above 3 and few steps, a warm-up step can have a higher
      order than ``lower_order_final`` would give it: A1111 applies it after the warm-up only, as here);
    - the last step has no corrector: its model call would only serve a next step;
    - a^P = 1/2 for UniP-2 and a^C = 1/2 for UniC-1, the limits h -> 0 of the solved values, instead of the
      solution of the order conditions;
    - ``variant="vary_coeff"``: B(h) = 1 and the a of :func:`vary_coeff_coefficients`, no fixed 1/2s.

    A1111 refuses fewer steps than ``order`` (an assertion); here the order is lowered to the step count,
    which is exactly what A1111 computes with its "UniPC order" option set to that count."""
    if variant not in UNIPC_VARIANTS:
        raise ArgumentError(f"UniPC variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)] + [0.0]
    n = len(ts) - 1
    order = max(1, min(int(order), n))
    log_a = [log_alpha(denoiser.schedule, t) for t in ts]
    alpha = [math.exp(la) for la in log_a]
    sigma = [math.sqrt(-math.expm1(2.0 * la)) for la in log_a]  # sigma^2 = 1 - alpha^2 (variance preserving)
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]

    def data_prediction(x: torch.Tensor, j: int) -> torch.Tensor:
        """x0 = (x_t - sigma_t eps) / alpha_t, DDPM eq. 4 solved for x0, at time point j."""
        return (x - sigma[j] * denoiser.eps(x, ts[j])) / alpha[j]

    # (time-point index, x0 estimate) of the last `order` points, newest last.
    history: list[tuple[int, torch.Tensor]] = [(0, data_prediction(x, 0))]
    for i in range(1, n + 1):
        p = min(order, n + 1 - i) if lower_order_final and i >= order else min(order, i)
        prev, m_prev = history[-1]
        h = lam[i] - lam[prev]
        older = history[-p:-1][::-1]  # the p - 1 points before t_{i-1}, nearest first
        rs = [(lam[j] - lam[prev]) / h for j, _ in older]
        D = [(m_j - m_prev) / r for (_, m_j), r in zip(older, rs)]
        if variant == "vary_coeff":
            B, (a_p, a_c) = 1.0, vary_coeff_coefficients(rs, -h)
        else:
            B, b = unipc_coefficients(p, -h, variant)
            a_p = [] if p == 1 else [0.5] if p == 2 else _solve(rs, b[:-1])
            a_c = [0.5] if p == 1 else _solve(rs + [1.0], b)

        x_1 = (sigma[i] / sigma[prev]) * x - (alpha[i] * math.expm1(-h)) * m_prev
        x_pred = x_1 - (alpha[i] * B) * sum((a * d for a, d in zip(a_p, D)), torch.zeros_like(x))
        if i == n:
            x, denoised = x_pred, x_pred
        else:
            m_i = data_prediction(x_pred, i)
            correction = sum((a * d for a, d in zip(a_c, D)), a_c[-1] * (m_i - m_prev))
            x = x_1 - (alpha[i] * B) * correction
            history = (history + [(i, m_i)])[-order:]
            denoised = m_i
        if _stopped(callback, i - 1, ts[i - 1], x, denoised):
            break
    return x
