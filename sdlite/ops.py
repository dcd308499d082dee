"""The compute kernels the UNet and the VAE share, each with one performance or memory choice.

:func:`attention` — scaled dot-product attention, optionally a slice of queries at a time (the
low-memory option). ``softmax(q kᵀ / √d) v`` is independent for every query row, so computing it
for ``chunk`` queries at a time gives the same numbers while the ``[L, N]`` score matrix only ever
exists for ``chunk`` rows. On a GPU whose SDPA falls back to the plain ("math") kernel — large
head sizes such as the VAE's single 512-wide head, or older cards — this bounds the peak memory of
attention over 4096+ tokens; where a fused kernel runs, chunking only costs a little speed.

:class:`Conv2d` — ``nn.Conv2d`` (same parameters, same state-dict names) that, on an AVX2 CPU in
fp32, runs the convolutions that are small matrix products through im2col + BLAS instead of
oneDNN. PyTorch sends every CPU convolution to oneDNN. As a matrix product a 3x3 conv has
``batch·H·W`` rows and ``9·C_in`` columns; for the UNet's low-resolution levels at batch 2 (8×8 and
16×16 maps, 640–2560 input channels: 128–512 rows, thousands of columns) the BLAS path was
1.2–2.3× faster on this project's AVX2 machine, while oneDNN wins with many rows (large maps,
large batches) or few channels (measured: benchmarks/RESULTS.md, "Levers"). Both paths compute
the same convolution; results agree to float rounding.

:class:`GroupNorm` — ``nn.GroupNorm`` that can normalise with statistics recorded on another
input. A tiled VAE decode needs it: a tile that shows only flat background has tiny variances,
and normalising it by its own statistics blows its noise up into visible blotches. Decoding a
downscaled copy of the whole latent first and reusing each layer's statistics on every tile keeps
all tiles on the same scale (the idea of the "Tiled VAE" extension for the A1111 web UI, which
computes exact statistics layer by layer; ours are an approximation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
    """``[B, heads, L, d] x [B, heads, N, d] -> [B, heads, L, d]``; ``query_chunk`` queries at a time if set."""
    if not query_chunk or q.shape[-2] <= query_chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(query_chunk, dim=-2)], dim=-2)


# Convolutions with at most BLAS_CONV_MAX_ROWS rows (batch·H·W) and at least BLAS_CONV_MIN_CHANNELS
# input channels use im2col + BLAS on AVX2 CPUs (None: never). Measured on an AVX2 CPU only; other
# CPUs (AVX-512, AMX: where oneDNN has its widest kernels) keep PyTorch's default until measured.
BLAS_CONV_MAX_ROWS: int | None = 512 if torch.backends.cpu.get_cpu_capability() == "AVX2" else None
BLAS_CONV_MIN_CHANNELS = 512


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the CPU backend choice above; everything else is inherited."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        limit = BLAS_CONV_MAX_ROWS
        # Under torch.compile the switch would break the graph at every conv (and recompile per
        # shape); the compiler chooses its own kernels there.
        if (limit is not None and not torch.compiler.is_compiling()
                and input.device.type == "cpu" and input.dtype == torch.float32
                and self.in_channels >= BLAS_CONV_MIN_CHANNELS
                and input.shape[0] * input.shape[-1] * input.shape[-2] <= limit):
            # The switch behind torch.backends.mkldnn.flags(enabled=...), without that context
            # manager's other settings (it also resets the TF32 flag, which warns on every call).
            previous = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return super()._conv_forward(input, weight, bias)
            finally:
                torch._C._set_mkldnn_enabled(previous)
        return super()._conv_forward(input, weight, bias)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` plus a ``stats`` mode for tiled decoding: ``None`` (normal), ``"record"``
    (normalise as usual and keep the per-sample, per-group mean and variance) or ``"reuse"``
    (normalise with the kept ones). Use it through :func:`shared_statistics`."""

    stats: str | None = None
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is None:
            return super().forward(x)
        b, g = x.shape[0], self.num_groups
        grouped = x.float().reshape(b, g, -1)
        if self.stats == "record":
            self.recorded = (grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True))
        assert self.recorded is not None, "record the statistics first"
        mean, var = self.recorded
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)


@contextlib.contextmanager
def shared_statistics(module: nn.Module) -> Iterator[Callable[[str], None]]:
    """Inside, ``set_mode("record")`` makes every :class:`GroupNorm` in ``module`` keep its statistics
    and ``set_mode("reuse")`` normalises with them; on exit everything is back to normal."""
    norms = [m for m in module.modules() if isinstance(m, GroupNorm)]

    def set_mode(mode: str) -> None:
        for m in norms:
            m.stats = mode

    try:
        yield set_mode
    finally:
        for m in norms:
            m.stats, m.recorded = None, None
