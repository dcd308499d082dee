"""An experiment measured by ``bench.py --levers``, not part of sdlite: 3x3 convolutions by
Winograd's minimal filtering F(2x2, 3x3), written with plain PyTorch ops.

It does 2.25x fewer multiply-adds than the direct convolution, but its input and output transforms
are memory-bound passes over tensors 4x the size of the activations. On the 2-core AVX2 machine of
benchmarks/RESULTS.md the saved arithmetic and the extra memory traffic nearly cancel (see the
levers table), so sdlite keeps oneDNN / im2col + BLAS (``sdlite/ops.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from sdlite import ops

def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel and even H, W, by Winograd's minimal
    filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).

    Each 2x2 block of the output depends on a 4x4 tile ``d`` of the padded input. Instead of 2·2·9 =
    36 multiplications per channel pair, the tile and the kernel ``g`` are taken into a 4x4
    "Winograd domain" where the convolution becomes an element-wise product::

        Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A        (16 multiplications)

        Bᵀ = [[1, 0,-1, 0],    G = [[ 1,   0,   0 ],    Aᵀ = [[1, 1, 1, 0],
              [0, 1, 1, 0],         [1/2, 1/2, 1/2],          [0, 1,-1,-1]]
              [0,-1, 1, 0],         [1/2,-1/2, 1/2],
              [0, 1, 0,-1]]         [ 0,   0,   1 ]]

    Summed over input channels, each of the 16 positions of the domain is one matrix product
    ``U[p] (out × in) @ V[p] (in × tiles)``, so the convolution is 16 GEMMs with 2.25x fewer
    multiply-adds than the direct one. The transforms are additions only (and halvings, for the
    kernel). Rounding differs from the direct convolution by a few float32 ulps of the output scale.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = h // 2, w // 2
    # Kernel transform U = G g Gᵀ for every (out, in) pair at once: vec(G g Gᵀ) = (G ⊗ G) vec(g).
    u = torch.mm(_GG.to(weight), weight.reshape(k * c, 9).t()).view(16, k, c)
    # Input transform V = Bᵀ d B for every tile. Tiles start every 2 pixels, so split the padded
    # input by row and column parity first (pixel_unshuffle): then row a of every tile is one
    # contiguous slice, p[:, :, a % 2, :, a // 2 : a // 2 + th], and every step below runs on
    # contiguous rows. Rows first (Bᵀ d), then columns ((Bᵀ d) B), written straight into the
    # [16, in, tiles] layout the GEMMs read.
    p = F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2).view(n, c, 2, 2, th + 1, tw + 1).transpose(0, 1)
    d = [p[:, :, a % 2, :, a // 2:a // 2 + th] for a in range(4)]  # [in, batch, 2, th, tw + 1]
    rows = x.new_empty(4, c, n, 2, th, tw + 1)
    torch.sub(d[0], d[2], out=rows[0])
    torch.add(d[1], d[2], out=rows[1])
    torch.sub(d[2], d[1], out=rows[2])
    torch.sub(d[1], d[3], out=rows[3])
    e = [rows[:, :, :, b % 2, :, b // 2:b // 2 + tw] for b in range(4)]  # [4, in, batch, th, tw]
    v = x.new_empty(4, 4, c, n, th, tw)
    torch.sub(e[0], e[2], out=v[:, 0])
    torch.add(e[1], e[2], out=v[:, 1])
    torch.sub(e[2], e[1], out=v[:, 2])
    torch.sub(e[1], e[3], out=v[:, 3])
    del p, d, rows, e
    # The 16 GEMMs: M[p] = U[p] @ V[p].
    m = torch.bmm(u, v.view(16, c, n * th * tw)).view(4, 4, k, n, th, tw)
    del v
    # Output transform Y = Aᵀ M A. Position (1, 1) of M reaches all four outputs with weight +1, so
    # the bias is added there once.
    if bias is not None:
        m[1, 1] += bias.view(k, 1, 1, 1)
    s = x.new_empty(2, 4, k, n, th, tw)  # Aᵀ M
    torch.add(m[0], m[1], out=s[0])
    s[0] += m[2]
    torch.sub(m[1], m[2], out=s[1])
    s[1] -= m[3]
    del m
    # (Aᵀ M) A, into [batch, out, 2, 2, th, tw]; pixel_shuffle puts each 2x2 block in place.
    q = x.new_empty(n, k, 2, 2, th, tw)
    qv = q.permute(2, 3, 1, 0, 4, 5)  # [2, 2, out, batch, th, tw], a view of q
    torch.add(s[:, 0], s[:, 1], out=qv[:, 0])
    qv[:, 0] += s[:, 2]
    torch.sub(s[:, 1], s[:, 2], out=qv[:, 1])
    qv[:, 1] -= s[:, 3]
    return F.pixel_shuffle(q.view(n, 4 * k, th, tw), 2)


_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = torch.kron(_G, _G)  # [16, 9]


@contextlib.contextmanager
def winograd_unet_convs(min_rows: int = 512, min_channels: int = 320, max_in_out: int = 640 * 1280) -> Iterator[None]:
    """Inside, every stride-1 3x3 ``sdlite.ops.Conv2d`` with at least ``min_rows`` rows (batch·H·W),
    ``min_channels`` input and output channels, ``in·out <= max_in_out`` (the kernel transform is
    redone each call, so the widest layers are left out) and even H, W runs through
    :func:`winograd_conv3x3`."""
    original = ops.Conv2d._conv_forward

    def forward(self: ops.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, _, h, w = input.shape
        if (weight.shape[-2:] == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1) and self.groups == 1
                and n * h * w >= min_rows and min(self.in_channels, self.out_channels) >= min_channels
                and self.in_channels * self.out_channels <= max_in_out and h % 2 == 0 and w % 2 == 0):
            return winograd_conv3x3(input, weight, bias)
        return original(self, input, weight, bias)

    ops.Conv2d._conv_forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        ops.Conv2d._conv_forward = original  # type: ignore[method-assign]
