"""How a seed becomes the starting noise, as the AUTOMATIC1111 web UI makes it.

A seed picks one point of the noise space: image i's noise is the first draw of a CPU random stream
seeded with its seed, so the same seed gives the same picture on every device and in every batch
(:func:`random_streams`). Two of A1111's seed tools move that point, and a third reseeds what the
sampler draws later:

- **Variation seeds** ("Variation seed", "Variation strength"): the noise is a spherical interpolation
  (:func:`slerp`) from the seed's noise towards a second seed's. At strength 0.05–0.2 the picture keeps
  its composition and changes its details; a batch keeps the seed and counts the variation seed up, so
  it shows variations of one picture.
- **Resize seed from** (a width and height): the seed's noise is drawn at the size where the seed was
  found and centred in the new size's noise (:func:`paste_centred`), so a composition mostly survives
  a change of aspect ratio.
- **Eta noise seed delta** (ENSD, a setting; 31337 in many shared anime-model infotexts): the noise
  the ancestral samplers add while sampling comes from a stream seeded with seed + ENSD instead of
  from the seed's own stream after the starting noise.

All three reproduce A1111's numbers, quirks included (each one is named where it happens). The one
difference: A1111 also reseeds DDIM's, Restart's and LCM's noise with the ENSD without writing it in the
infotext; the pipeline applies it only where A1111 writes it, so an image can be made again from its
infotext (:meth:`sdlite.pipeline.Pipeline._seed_tools`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ArgumentError

__all__ = ["SEED_MAX", "SEED_MIN", "check_seed", "random_streams", "slerp", "paste_centred"]

# The largest seed a torch.Generator takes (a 64-bit unsigned integer).
SEED_MAX = 2**64 - 1
SEED_MIN = -(2**63)  # a negative seed s seeds torch (and the A1111 web UI) with 2**64 + s


def check_seed(seed: int, n_images: int = 1, name: str = "seed") -> None:
    """:class:`ArgumentError` unless ``seed`` and the ``n_images - 1`` seeds after it (image i of a run
    uses ``seed + i``) all fit a torch.Generator: [-2**63, 2**64 - 1], where a negative seed ``s`` is
    the same stream as ``2**64 + s`` (torch's rule, so the A1111 web UI's too: it passes any seed but -1
    to torch). -1 itself means "random" only as the seed asked for, which callers resolve before this
    check. ``name``: how the caller's user spells it (``--seed``)."""
    largest = SEED_MAX - (n_images - 1)
    if not SEED_MIN <= seed <= largest:
        batch = f", and image i of the {n_images} uses {name} + i: give {name} ≤ {largest}" if n_images > 1 else ""
        raise ArgumentError(f"{name} must be -1 (random) or in [-2**63, 2**64 - 1]{batch}, got {seed}")


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) from ``low`` (t = 0) to ``high`` (t = 1) of noise
    tensors ``[C, H, W]``, as A1111's variation seeds compute it.

    Two independent Gaussian vectors are nearly orthogonal and of nearly equal length; a straight line
    between them passes close to the origin, where noise of that length never lies, so its midpoint
    would be noise of ~0.71 the standard deviation (a washed-out image). Along the great circle,

        slerp(t) = sin((1 − t)·ω)/sin ω · low + sin(t·ω)/sin ω · high,   cos ω = <low, high>/(|low|·|high|),

    every point keeps unit variance.

    A1111's quirk, kept for its images: the angle ω is measured per column, along the height axis
    (``dim=1`` of its ``[C, H, W]`` noise), one angle per (channel, x), not once over the whole tensor.
    Where the two noises are all but equal (mean cos ω > 0.9995: the same seed twice) the angle is too
    small to divide by and the straight line is used (A1111 weighs that line the other way round, which
    only matters when the two differ, so not here).
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    cos = (low_unit * high_unit).sum(1)  # [C, W]
    if cos.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin).unsqueeze(1) * low + (torch.sin(t * omega) / sin).unsqueeze(1) * high


def paste_centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """``small`` ``[C, h, w]`` centred on ``big`` ``[C, H, W]`` (a copy of ``big`` is changed): where
    ``small`` is the larger along an axis, its centre is cut out; where it is the smaller, the rest stays
    ``big``'s. A1111's arithmetic, with its quirk: the offset is ``(H − h) // 2`` rounded down, and where
    ``small`` is cut by an odd number of rows it loses one row more than it needs (``h + 2·offset``), so
    the last row of the result keeps ``big``'s noise."""
    out = big.clone()
    spans = []
    for n_big, n_small in ((big.shape[1], small.shape[1]), (big.shape[2], small.shape[2])):
        offset = (n_big - n_small) // 2
        length = n_small if offset >= 0 else n_small + 2 * offset
        spans.append((max(offset, 0), max(-offset, 0), length))  # (where in big, where in small, how many)
    (ty, sy, h), (tx, sx, w) = spans
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


def random_streams(seeds: Sequence[int], shape: Sequence[int], *,
                   variation_seeds: Sequence[int] | None = None, variation_strength: float = 0.0,
                   seed_shape: Sequence[int] | None = None,
                   noise_seed_delta: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One CPU random stream per image, as the A1111 web UI keeps them: stream i is seeded with
    ``seeds[i]``; its first draw is image i's starting noise ``[*shape]``, later draws are the sampler's
    (ancestral/SDE) noise. Image i of a batch therefore equals the single image made with its seed, on
    every device (to rounding; not with DPM adaptive, whose step sizes serve the whole batch, nor for
    prompts padded to a longer one's chunks, both as in A1111). Returns the starting noise ``[B, *shape]`` and the generators, advanced past it.

    ``variation_seeds``, ``variation_strength``: the noise becomes :func:`slerp` (strength) from the seed's
    noise to that of ``variation_seeds[i]``, drawn from a stream of its own (0 = off). ``seed_shape``:
    A1111's "Resize seed from": the seed's noise (and the variation seed's) is drawn at this shape and
    :func:`paste_centred` on the seed's noise at ``shape``. Neither changes the sampler's later draws.
    ``noise_seed_delta``: A1111's "Eta noise seed delta" (ENSD): the returned generators, the sampler's
    noise, are fresh streams seeded with ``seeds[i] + noise_seed_delta`` instead (0 = off)."""
    shape, seed_shape = tuple(shape), tuple(shape if seed_shape is None else seed_shape)
    if variation_strength and (variation_seeds is None or len(variation_seeds) != len(seeds)):
        raise ArgumentError("variation seeds: give one variation seed per image")
    generators = [_stream(s) for s in seeds]
    xs = []
    for i, (seed, g) in enumerate(zip(seeds, generators)):
        # At another shape, the seed's noise comes from a stream of its own and g's first draw is the
        # full-size noise below, so the sampler's later draws are the same as without the resize.
        x = torch.randn(shape, generator=g) if seed_shape == shape else torch.randn(seed_shape, generator=_stream(seed))
        if variation_strength:
            x = slerp(variation_strength, x, torch.randn(seed_shape, generator=_stream(variation_seeds[i])))
        if seed_shape != shape:
            x = paste_centred(x, torch.randn(shape, generator=g))
        xs.append(x)
    if noise_seed_delta:
        generators = [_stream(int(seed) + noise_seed_delta) for seed in seeds]
    return torch.stack(xs), generators


def _stream(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))
