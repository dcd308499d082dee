"""The Beta distribution's CDF and its inverse, for the "Beta" step schedule (Lee et al. 2024).

AUTOMATIC1111 builds that schedule with ``scipy.stats.beta.ppf``. scipy is not a dependency of sdlite, so
the two functions are written here from the classical formulas, in float64 Python arithmetic:

- the regularized incomplete beta function ``I_x(a, b)`` (the CDF of Beta(a, b)) by its continued
  fraction, evaluated with the modified Lentz method;
- its inverse in x (the quantile function, "ppf") by Newton's method kept inside a bisection bracket.

Both are scalar and pure; a schedule needs at most a few hundred quantiles.

    >>> round(incomplete_beta(0.5, 0.6, 0.6), 12), round(beta_ppf(0.25, 1.0, 1.0), 12)
    (0.5, 0.25)
"""

from __future__ import annotations

import math
import sys

from ..errors import ArgumentError

__all__ = ["incomplete_beta", "beta_ppf"]

# The continued fraction stops when a further term changes it by less than this (relative), i.e. at
# about machine precision; the inverse stops when a Newton step is that small relative to x.
_EPS = 4 * sys.float_info.epsilon
# Lentz's guard against a zero denominator: any value far below the ones that occur.
_TINY = 1e-300
# The fraction needs O(sqrt(max(a, b))) terms (Press et al., Numerical Recipes, section 6.4), so this
# covers shape parameters up to ~1e7; the schedule's are around 1.
_MAX_TERMS = 20_000
_MAX_NEWTON = 200


def _check_shape(a: float, b: float) -> None:
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ArgumentError(f"the Beta distribution's shape parameters must be positive and finite, "
                            f"got a={a}, b={b}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ArgumentError(f"{name} must lie in [0, 1], got {value}")


def _log_beta(a: float, b: float) -> float:
    """ln B(a, b) = ln Gamma(a) + ln Gamma(b) - ln Gamma(a + b)."""
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _continued_fraction(x: float, a: float, b: float) -> float:
    """K = 1 + d_1 / (1 + d_2 / (1 + ...)), the continued fraction of I_x(a, b), by the modified Lentz method.

    d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),   d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).

    Lentz's method evaluates the fraction front to back: with C_j = A_j / A_{j-1} and D_j = B_{j-1} / B_j
    (A_j / B_j the j-th convergent) it multiplies f by C_j D_j until that factor is 1 to machine precision, so no
    depth is fixed in advance and the A_j, B_j, which can over/underflow, never appear. The "modified" part: a
    C or 1/D that comes out 0 is replaced by a tiny number before it is divided by."""
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, _MAX_TERMS):
        m = j // 2
        if j % 2:
            dj = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            dj = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + dj * d
        d = 1.0 / (d if abs(d) >= _TINY else _TINY)
        c = 1.0 + dj / c
        c = c if abs(c) >= _TINY else _TINY
        delta = c * d
        f *= delta
        if abs(delta - 1.0) <= _EPS:
            return f
    raise ArgumentError(f"the incomplete beta function did not converge for a={a}, b={b} "
                        f"(shape parameters this large are not supported; use values below 1e6)")


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), the CDF of the Beta(a, b) distribution at ``x``.

    I_x(a, b) = B(x; a, b) / B(a, b) = 1 / B(a, b) * integral_0^x t^(a-1) (1 - t)^(b-1) dt, for x in [0, 1].

    Evaluated by the continued fraction (Abramowitz & Stegun 26.5.8; Press et al., Numerical Recipes 6.4)

        I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...))),

    which converges quickly for x < (a + 1) / (a + b + 2); above that point the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) moves x to the side where it does. The prefactor is formed in logs
    (ln B from ``math.lgamma``), so tiny or huge powers do not under/overflow before they combine.
    Accurate to a few units of 1e-16 absolute for the shape parameters of a schedule (around 1; ln B loses
    digits to cancellation as a, b grow: ~1e-12 at a = b = 1000). ``a``, ``b`` > 0, else :class:`ArgumentError`.

    >>> incomplete_beta(0.3, 1.0, 1.0), incomplete_beta(0.0, 0.6, 0.6), incomplete_beta(1.0, 0.6, 0.6)
    (0.3, 0.0, 1.0)
    >>> round(incomplete_beta(0.5, 2.0, 3.0), 12)  # 11/16: the CDF of Beta(2, 3) is a polynomial
    0.6875
    """
    x, a, b = float(x), float(a), float(b)
    _check_shape(a, b)
    _check_unit("x", x)
    if x == 0.0 or x == 1.0:
        return x
    # ln(x^a (1 - x)^b / B(a, b)): symmetric in (x, a) <-> (1 - x, b), so both branches share it.
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) / (a * _continued_fraction(x, a, b))
    return 1.0 - math.exp(log_front) / (b * _continued_fraction(1.0 - x, b, a))


def _initial_guess(q: float, a: float, b: float, log_beta: float) -> float:
    """A start for Newton: the tails' leading terms inverted, else the mean.

    Near 0, I_x(a, b) ~ x^a / (a B(a, b)); near 1, 1 - I_x(a, b) ~ (1 - x)^b / (b B(a, b))."""
    mean = a / (a + b)
    lower = math.exp((math.log(q) + math.log(a) + log_beta) / a)
    upper = 1.0 - math.exp((math.log1p(-q) + math.log(b) + log_beta) / b)
    for x in (lower if lower < mean else None, upper if upper > mean else None, mean):
        if x is not None and 0.0 < x < 1.0:
            return x
    return 0.5


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile function of Beta(a, b): the x in [0, 1] with I_x(a, b) = ``q`` (scipy's ``beta.ppf``).

    Solves F(x) = I_x(a, b) - q = 0 by Newton's method, x <- x - F(x) / f(x) with the density
    f(x) = x^(a-1) (1 - x)^(b-1) / B(a, b) = dI_x/dx, safeguarded by a bracket [lo, hi] with F(lo) < 0 < F(hi)
    that every evaluation narrows: a Newton step that would leave the bracket (as it can near an end where
    the density is infinite or zero) is replaced by bisection. It starts from the inverted tail asymptotics
    (see :func:`_initial_guess`) and stops when a step is below ~1e-15 relative to x, i.e. at about machine
    precision where the problem is well conditioned (far inside 1e-12). The ends are exact:
    ``beta_ppf(0) = 0``, ``beta_ppf(1) = 1``. ``a``, ``b`` > 0 and ``q`` in [0, 1], else :class:`ArgumentError`.

    >>> beta_ppf(0.0, 0.6, 0.6), beta_ppf(1.0, 0.6, 0.6), round(beta_ppf(0.5, 0.6, 0.6), 12)
    (0.0, 1.0, 0.5)
    >>> round(beta_ppf(0.6875, 2.0, 3.0), 12)
    0.5
    """
    q, a, b = float(q), float(a), float(b)
    _check_shape(a, b)
    _check_unit("q", q)
    if q == 0.0 or q == 1.0:
        return q
    if q > 0.5:
        # The upper half as the lower half of the mirrored distribution (1 - q is exact here), so the
        # residual below always compares small probabilities instead of 1 - (something near 1).
        return 1.0 - _newton(1.0 - q, b, a)
    return _newton(q, a, b)


def _newton(q: float, a: float, b: float) -> float:
    """The safeguarded Newton iteration of :func:`beta_ppf` for 0 < q <= 1/2."""
    log_beta = _log_beta(a, b)
    lo, hi = 0.0, 1.0
    x = _initial_guess(q, a, b, log_beta)
    for _ in range(_MAX_NEWTON):
        residual = incomplete_beta(x, a, b) - q
        if residual == 0.0:
            return x
        if residual < 0.0:
            lo = x
        else:
            hi = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_beta)
        newton = x - residual / density if 0.0 < density < math.inf else math.nan
        if lo < newton < hi:  # False for NaN: bisect
            if abs(newton - x) <= _EPS * newton:
                return newton
            x = newton
        else:
            x = 0.5 * (lo + hi)
            if hi - lo <= _EPS * hi or not lo < x < hi:
                return x
    # Only reached where rounding noise in I_x outweighs the density (q within ~1e-13 of an end with a
    # zero density there); x is then as good as the float64 residual allows.
    return x
