"""sdlite's own CUDA kernels, in Triton: GroupNorm, optionally followed by SiLU, as two kernels (the
GPU path of :func:`sdlite.ops.group_norm`), and the GELU gate of the UNet's feed-forward layer, ``a ·
gelu(g)``, as one (:func:`sdlite.ops.gelu_product`).

Why a kernel of our own. On CUDA, PyTorch's ``group_norm`` only takes NCHW-contiguous input: it
copies a channels-last map (sdlite's UNet on CUDA is channels-last) to NCHW, normalises it in two
more passes (statistics, then scale and shift), the SiLU that follows is a fourth, and the next
convolution copies the NCHW result back to channels-last: five passes that read and write the
whole map, and six kernel launches. Here the same function takes two passes in either layout, the
statistics and one fused ``normalise -> scale and shift -> SiLU`` pass, and never changes the layout.

The arithmetic. For sample ``b`` and group ``g`` (``C / G`` channels times ``H·W`` pixels, ``n``
numbers ``x_i``)::

    mean = Σ x_i / n,   var = Σ (x_i - mean)² / n        (biased, as torch.nn.GroupNorm)
    y    = (x - mean) / sqrt(var + eps) · weight[c] + bias[c],   then y · sigmoid(y) if silu

computed in fp32 whatever the input dtype, rounded once to the input dtype at the end. To spread a
group over many GPU blocks, its pixels are cut into tiles: each block of the first kernel holds one
tile and writes that tile's mean and ``M2 = Σ (x - mean_tile)²`` (exact two-pass statistics inside
the tile, from registers); each block of the second kernel merges all tiles of its group with Chan
et al.'s parallel formula (``M2 = Σ M2_t + Σ n_t (mean_t - mean)²``, no cancellation however large
the mean) and normalises its own tile. Every block of a group merges the same statistics again, a
read of 8 bytes per tile of the group (from L2): little on the UNet's maps (at most 32 tiles),
as many bytes as the block's own tile on the 1024x1024 maps of an untiled 1024² VAE decode (1024
tiles); a third kernel that merges once per group would avoid it, for one more launch per call.

Triton compiles a variant of each kernel per dtype, layout and set of compile-time constants (the
channels per group and their padded block, SiLU, the merge block) the first time it meets one, and
keeps it in its disk cache. The constants do not depend on the map's size (the tile's pixel count
follows from the channel block; the merge block is at least ``MERGE_TILES``), so an SD1.5 512x512
generation needs 25 variants, not the 34 it needed when they did. On an H100 host, building those
25 took 8.1 s with an empty cache against 11.4 s for the 34, and a new process loads them in ~0.5 s
(benchmarks/RESULTS-cuda-kernels.md, session 17).

Triton is not one of sdlite's dependencies: it comes with PyTorch's CUDA wheels on Linux, and this
module is imported only when a CUDA tensor asks for it (:func:`sdlite.ops.group_norm`), never on
the CPU path. ``TRITON_INTERPRET=1`` runs these kernels on CPU tensors; the tests do that.

The GELU gate. GEGLU (the feed-forward layer of every transformer block) computes ``a · gelu(g)``
from two halves of a linear layer's output. In PyTorch that is two passes: ``gelu(g)`` reads ``g``
and writes its result, then the product reads both and writes one: five tensor-sized transfers,
on the UNet's widest activations (4x the model width per token). :func:`gelu_product_` reads ``a``
and ``g`` once and writes once, with the exact (erf) GELU in fp32 and one rounding.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Elements (pixels x padded channels) one block holds, and its warps. Swept on an H100
# (benchmarks/bench_cuda.py --group-norm, RESULTS-cuda.md): 4096 / 4 and 8192 / 8 within 1% of each
# other on the UNet and the VAE; 2048 / 4 and 4096 / 8 took twice as long on the VAE's large maps.
TILE_ELEMENTS = 4096
NUM_WARPS = 4
# The normalising kernel merges the statistics of all of its group's tiles at once, a block of at least
# this many (masked beyond the group's count): one compiled variant serves every map with up to this
# many tiles per group (all of the UNet's; the VAE's large maps add one per power of two above).
MERGE_TILES = 32


@triton.jit
def _tile(bg, tile, HW, G, CPG, stride_b, stride_c, stride_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Where tile ``tile`` of group ``bg % G`` of sample ``bg // G`` lies: its group, its channels
    within the group, the offsets of its elements and which of them exist (pixels x channels)."""
    b = bg // G
    g = bg % G
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mask = (p < HW)[:, None] & (c < CPG)[None, :]
    offsets = b * stride_b + (g * CPG + c)[None, :] * stride_c + p[:, None] * stride_p
    return g, c, offsets, mask


@triton.jit
def _tile_statistics(x_ptr, stats_ptr, HW, G, stride_b, stride_c, stride_p,
                     CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Block (b·G + g, t): mean and M2 of tile t (BLOCK_P pixels) of group g of sample b."""
    bg = tl.program_id(0)
    tile = tl.program_id(1)
    _, _, offsets, mask = _tile(bg, tile, HW, G, CPG, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    n = (tl.minimum(HW - tile * BLOCK_P, BLOCK_P) * CPG).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    out = stats_ptr + (bg * tl.num_programs(1) + tile) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit(do_not_specialize=["G", "TILES"])
def _normalize(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, HW, G, TILES, eps, stride_b, stride_c, stride_p,
               CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TILES_POW2: tl.constexpr,
               SILU: tl.constexpr):
    """Block (b·G + g, t): merge the statistics of group g's tiles, then normalise tile t."""
    bg = tl.program_id(0)
    tile = tl.program_id(1)
    # Chan et al.: the mean and M2 of the whole group from those of its tiles.
    t = tl.arange(0, TILES_POW2)
    t_mask = t < TILES
    tile_mean = tl.load(stats_ptr + (bg * TILES + t) * 2, mask=t_mask, other=0.0)
    tile_m2 = tl.load(stats_ptr + (bg * TILES + t) * 2 + 1, mask=t_mask, other=0.0)
    tile_n = tl.where(t_mask, tl.minimum(HW - t * BLOCK_P, BLOCK_P) * CPG, 0).to(tl.float32)
    n = tl.sum(tile_n, axis=0)
    mean = tl.sum(tile_n * tile_mean, axis=0) / n
    spread = tile_mean - mean
    var = (tl.sum(tile_m2, axis=0) + tl.sum(tile_n * spread * spread, axis=0)) / n
    rstd = 1.0 / tl.sqrt(var + eps)

    g, c, offsets, mask = _tile(bg, tile, HW, G, CPG, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    c_mask = c < CPG
    scale = tl.load(w_ptr + g * CPG + c, mask=c_mask, other=0.0).to(tl.float32) * rstd
    shift = tl.load(b_ptr + g * CPG + c, mask=c_mask, other=0.0).to(tl.float32)

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) first: folding the mean into the shift (x * scale + shift') would cancel large
    # terms when the mean is large against the spread.
    y = (x - mean) * scale[None, :] + shift[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def _on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not on the tensors' (PyTorch's own ops switch to
    it): make ``x``'s device current for the launch (nothing to do for a CPU tensor, the
    interpreter's)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def supports(x: torch.Tensor) -> bool:
    """Whether :func:`group_norm` takes ``x``: a non-empty 4-d float map, NCHW-contiguous or
    channels-last, small enough for 32-bit offsets."""
    return (
        x.dim() == 4
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and 0 < x.numel() < 2**31
    )


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then ``F.silu`` if ``silu``; a new
    tensor in ``x``'s dtype and memory layout. Statistics and arithmetic in fp32. No autograd. For
    ``x`` a ``[B, C, H, W]`` map on CUDA:

    >>> y = group_norm(x, 32, norm.weight, norm.bias, 1e-5, silu=True)  # doctest: +SKIP
    """
    B, C, H, W = x.shape
    HW = H * W
    cpg = C // num_groups
    # empty_like keeps x's strides for a dense map (NCHW or channels-last), so both tensors share
    # the offsets below; the pixel stride is the one of W, since H and W are collapsed.
    y = torch.empty_like(x)
    stride_b, stride_c, stride_p = x.stride(0), x.stride(1), x.stride(3)
    block_c = triton.next_power_of_2(cpg)
    # The tile's pixel count follows from the channel block alone, even on maps smaller than a tile
    # (masked off): one compiled variant per channel block, not one per map size too.
    block_p = max(1, TILE_ELEMENTS // block_c)
    tiles = triton.cdiv(HW, block_p)
    stats = torch.empty((B * num_groups, tiles, 2), device=x.device, dtype=torch.float32)
    grid = (B * num_groups, tiles)
    with _on_device_of(x):
        _tile_statistics[grid](x, stats, HW, num_groups, stride_b, stride_c, stride_p,
                               CPG=cpg, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
        _normalize[grid](x, y, stats, weight, bias, HW, num_groups, tiles, eps, stride_b, stride_c, stride_p,
                         CPG=cpg, BLOCK_C=block_c, BLOCK_P=block_p,
                         TILES_POW2=max(MERGE_TILES, triton.next_power_of_2(tiles)), SILU=silu, num_warps=NUM_WARPS)
    return y


# Elements per block of the GELU product (a plain elementwise kernel: 4 warps, 8 elements each).
GELU_BLOCK = 1024


@triton.jit
def _gelu_product(a_ptr, g_ptr, N, BLOCK: tl.constexpr):
    """Block i: ``a[j] · gelu(g[j])`` for its BLOCK elements j, written over ``a``."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N
    a = tl.load(a_ptr + j, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + j, mask=mask).to(tl.float32)
    # gelu(g) = g · Φ(g), Φ the standard normal CDF: 0.5 · (1 + erf(g / √2)).
    y = a * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    tl.store(a_ptr + j, y.to(a_ptr.dtype.element_ty), mask=mask)


def supports_gelu_product(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :func:`gelu_product_` takes ``a`` and ``g``: one shape and dtype, both contiguous,
    non-empty and small enough for 32-bit offsets."""
    return (a.shape == g.shape and a.dtype == g.dtype and a.is_contiguous() and g.is_contiguous()
            and 0 < a.numel() < 2**31)


def gelu_product_(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)`` (the exact GELU, ``F.gelu``'s default), written into ``a`` and returned:
    contiguous tensors of one shape and dtype, arithmetic in fp32. No autograd.

    >>> h = gelu_product_(a, g)  # doctest: +SKIP
    >>> # h is a, now holding a * F.gelu(g)
    """
    n = a.numel()
    with _on_device_of(a):
        _gelu_product[(triton.cdiv(n, GELU_BLOCK),)](a, g, n, BLOCK=GELU_BLOCK, num_warps=4)
    return a
