"""Token merging (ToMe) for Stable Diffusion: Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion" (arXiv:2303.17604), as the AUTOMATIC1111 web UI applies it (its "Token merging ratio" setting).

Self-attention costs the square of the token count, and at the UNet's top level (64x64 = 4096 tokens
for a 512x512 image) it is most of the CPU time of a step. Neighbouring tokens are often nearly equal,
so ToMe averages the most similar ones before the self-attention and copies the results back after:

1. **Partition.** In each 2x2 cell of the token grid the top-left token is a *destination*; all others
   (three per cell, and the last row or column of an odd-sized grid) are *sources*.
2. **Match.** Each source is paired with its most similar destination: the largest cosine similarity
   of the transformer block's input tokens (ToMe's "bipartite soft matching").
3. **Merge.** The ``r = int(ratio * N)`` sources with the best matches are merged: each destination
   becomes the mean of itself and the sources matched to it; the other sources stay as they are. The
   self-attention then sees ``N - r`` tokens, as queries and as keys: about ``(1 - ratio)^2`` of its cost.
4. **Unmerge.** Every token takes the output of the token it went into.

Steps 3 and 4 are one map, ``slot[b, n]``: the row of the merged sequence that token ``n`` of sample
``b`` went into. Merging is a mean of the tokens by slot, unmerging a gather by slot.

The web UI's settings are fixed here: merge for self-attention only (not for the cross-attention or the
feed-forward), at the top level only (``max_downsample=1``), 2x2 cells, and the top-left destination in
every cell (``use_rand=False``: random choice can leave artefacts with some samplers). The merged sequence
lists the unmerged sources, in order of decreasing similarity, then the destinations; the order is free
(the self-attention does not depend on it), and the reference implementation's (the ``tomesd`` package,
which the web UI calls) is the same up to its unstable sort. ``ratio`` can go up to 0.75 (all sources merged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlite.errors import ArgumentError
from sdlite.ops import linear

# ToMe's 2x2 cells (``sx = sy = 2``): one destination per cell.
CELL = 2


# The largest ratio: every source merged (3 of the 4 tokens of a cell).
MAX_RATIO = 1.0 - 1.0 / CELL**2


def check_ratio(ratio: float, name: str = "token_merging_ratio") -> float:
    """``ratio`` as a float in [0, MAX_RATIO], else an :class:`~sdlite.errors.ArgumentError` naming it ``name``.

    >>> check_ratio(0.5)
    0.5
    """
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= MAX_RATIO:
        raise ArgumentError(f"{name} must be a number in [0, {MAX_RATIO}] (0: off), got {ratio!r}")
    return value


@dataclass(frozen=True)
class Merging:
    """What a SpatialTransformer hands its blocks: the token grid (``h`` x ``w``) and the ratio."""

    h: int
    w: int
    ratio: float

    def match(self, x: torch.Tensor) -> "TokenMerge":
        """The merge for tokens ``x`` ([B, h*w, C]), matched on ``x`` itself (steps 1-2)."""
        return match_tokens(x, self.h, self.w, int(x.shape[1] * self.ratio))


@dataclass(frozen=True)
class TokenMerge:
    """``slot``: [B, N] int64, the merged row of each token; ``rows``: the merged length N - r."""

    slot: torch.Tensor
    rows: int

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: the mean of the tokens of each slot.

        As sums into the rows of all samples at once (``index_add_`` over [B * rows, C], each sample's slots
        offset by its first row), then divided by the counts: the numbers of ``scatter_reduce(mean)``, at
        1/16 of its time on a CPU (0.5 against 8 ms for SD1.5's top level at batch 2)."""
        b, n, c = x.shape
        flat = (self.slot + self.rows * torch.arange(b, device=x.device)[:, None]).flatten()
        sums = x.new_zeros(b * self.rows, c).index_add_(0, flat, x.reshape(b * n, c))
        counts = torch.bincount(flat, minlength=b * self.rows).to(x.dtype)
        return sums.div_(counts[:, None]).view(b, self.rows, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: each token gets its slot's row."""
        b, n = self.slot.shape
        return torch.gather(y, 1, self.slot[..., None].expand(b, n, y.shape[-1]))


def partition(h: int, w: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the token indices (row-major over the h x w grid) of the destinations, the top-left token of
    each whole 2x2 cell, and of the sources, all the others; each in increasing order.

    >>> dst, src = partition(3, 4)
    >>> dst.tolist(), src.tolist()
    ([0, 2], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    """
    rows = torch.arange(0, (h // CELL) * CELL, CELL, device=device)
    cols = torch.arange(0, (w // CELL) * CELL, CELL, device=device)
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=device)
    is_dst[rows[:, None], cols[None, :]] = True
    index = torch.arange(h * w, device=device)
    return index[is_dst.flatten()], index[~is_dst.flatten()]


@torch.no_grad()
def match_tokens(x: torch.Tensor, h: int, w: int, r: int) -> TokenMerge:
    """Steps 1-3 for tokens ``x`` ([B, h*w, C]) and ``r`` tokens to remove (at most the sources' count)."""
    b, n, _ = x.shape
    if n != h * w:
        raise ArgumentError(f"{n} tokens do not make a {h}x{w} grid")
    dst, src = partition(h, w, x.device)
    r = max(0, min(r, len(src))) if len(dst) else 0  # a grid one token high or wide has no whole cell
    if r == 0:
        return TokenMerge(torch.arange(n, device=x.device).expand(b, n), n)
    unit = x / x.norm(dim=-1, keepdim=True)
    # [B, sources, destinations], cosine; per sample through ops.linear (oneDNN's GEMM on the CPU: in fp32 half
    # the time of a batched matmul, 10 against 20 ms at SD1.5's top level)
    similarity = torch.stack([linear(unit[i, src], unit[i, dst]) for i in range(b)])
    best, partner = similarity.max(dim=-1)  # each source's most similar destination
    order = best.argsort(dim=-1, descending=True)  # the r most similar sources are merged
    merged, kept = order[:, :r], order[:, r:]
    n_kept = len(src) - r
    slot = torch.empty(b, n, dtype=torch.long, device=x.device)
    slot[:, dst] = n_kept + torch.arange(len(dst), device=x.device)  # destinations: after the kept sources
    slot.scatter_(1, src[kept], torch.arange(n_kept, device=x.device).expand(b, n_kept))
    slot.scatter_(1, src[merged], n_kept + partner.gather(1, merged))  # a merged source: its destination's row
    return TokenMerge(slot, n_kept + len(dst))
