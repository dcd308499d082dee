#!/usr/bin/env python
"""Three CPU leads measured in session 22 and not shipped: what each would save on a whole SD1.5 UNet
step, from per-call timings of the exact shapes one step runs.

A lead that changes only some layers is timed on those layers' shapes, the old and the new way
alternating (``bench.alternate``, a warm-up round, medians), with packed weights as ``sdlite.load``
gives them. The shapes and their counts come from one step of the SD1.5 UNet at batch 2 on the meta
device (forward hooks), so *saved per step* is the sum over that step's calls, not a guess:

- **q, k, v as one product.** Each self-attention projects its tokens three times with square
  weights; one product with the three weights stacked reads the tokens once and makes a GEMM three
  times as wide.
- **The skip concatenation split.** Each ResBlock of the decoder half convolves the concatenation of
  its input and a skip connection. Two convs over the two parts, summed, would need no concatenated
  copy. (In the UNet a GroupNorm + SiLU over the concatenation comes first, so shipping it would
  also take a GroupNorm that writes two outputs; this times the convs alone, on two separate maps.)
- **3x3 convs on 4x4 maps as im2col + GEMM.** At batch 2 a 4x4 map is 32 output positions; the product
  is bound by reading the weights. The GEMM needs the weight packed as a linear layer's, and the
  same conv runs on 8x8 maps at 64x64 latents, where oneDNN's convolution is faster: shipping it
  would need both layouts, or a layout chosen by map size.

Usage::

    python benchmarks/cpu_leads.py --out benchmarks/RESULTS-cpu-leads.md

Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys

import torch
import torch.nn.functional as F

import bench  # benchmarks/bench.py (it puts the repository root on sys.path)
from sdlite import ops  # noqa: E402
from sdlite.unet.model import CrossAttention, ResBlock, UNetModel  # noqa: E402


def step_shapes(hw: int) -> dict[str, collections.Counter]:
    """The shapes of one SD1.5 UNet step at batch 2 on ``hw`` x ``hw`` latents, for each lead:
    ``qkv``: (tokens, channels) of each self-attention; ``split``: (C_h, C_skip, C_out, side) of
    each decoder ResBlock's first conv; ``small``: (C_in, C_out) of each 3x3 conv on a 4x4 map."""
    cfg = bench.SIZES["sd15"].unet
    found: dict[str, collections.Counter] = {k: collections.Counter() for k in ("qkv", "split", "small")}
    with torch.device("meta"):
        unet = UNetModel(cfg)
    skips = []  # the encoder blocks' output channels: the decoder takes them last-first, one per ResBlock

    def on_encoder_block(module, args, out):
        skips.append(out.shape[1])

    def on_attention(module, args, kwargs):
        x, context = args[0], (args[1] if len(args) > 1 else kwargs.get("context"))
        if context is None:  # self-attention
            found["qkv"][(x.shape[1], x.shape[2])] += 1

    def on_conv(module, args):
        x = args[0]
        if module.kernel_size == (3, 3) and x.shape[-1] <= 4:
            found["small"][(module.in_channels, module.out_channels)] += 1

    def on_decoder_resblock(module, args):  # its input is cat([h, skip])
        x, c_skip = args[0], skips.pop()
        found["split"][(x.shape[1] - c_skip, c_skip, module.in_layers[2].out_channels, x.shape[-1])] += 1

    handles = [b.register_forward_hook(on_encoder_block) for b in unet.input_blocks]
    handles += [m.register_forward_pre_hook(on_attention, with_kwargs=True) for m in unet.modules()
                if isinstance(m, CrossAttention)]
    handles += [m.register_forward_pre_hook(on_conv) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    handles += [m.register_forward_pre_hook(on_decoder_resblock) for block in unet.output_blocks for m in block
                if isinstance(m, ResBlock)]
    with torch.device("meta"), torch.no_grad():
        unet(torch.zeros(2, cfg.in_channels, hw, hw), torch.zeros(2), torch.zeros(2, 77, cfg.context_dim))
    for h in handles:
        h.remove()
    return found


def packed_linear(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def conv(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")


def im2col_gemm(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, c_out: int) -> torch.Tensor:
    """A padded 3x3 conv as one product of the unrolled input (as ``ops._conv_as_gemm``) with a weight
    packed as a linear layer's."""
    xp = F.pad(x, (1, 1, 1, 1))
    b, c, hp, wp = xp.shape
    h, w = hp - 2, wp - 2
    sb, sc, sh, sw = xp.stride()
    rows = xp.as_strided((b, h, w, c, 3, 3), (sb, sh, sw, sc, sh, sw)).reshape(b * h * w, c * 9)
    return ops._gemm(rows, packed, bias).view(b, h, w, c_out).permute(0, 3, 1, 2)


def time_pair(old, new, repeats: int) -> tuple[float, float, float]:
    """Medians (ms) of the old and the new way, alternating, and the new result's difference from
    the old one relative to its largest value."""
    with torch.no_grad():
        times, last = bench.alternate({"old": old, "new": new}, 1, repeats)
    a, b = last["old"], last["new"]
    if isinstance(a, (tuple, list)):
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    diff = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
    return statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3, diff


def read_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s of a bf16 sum over ``mib`` MiB on ``threads`` threads (best of 5): how fast this machine
    streams memory, against which a weight-bound layer's read rate is compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2 ** 20 // 2, dtype=torch.bfloat16)
        x.sum()
        best = min(bench.alternate({"sum": x.sum}, 0, 5)[0]["sum"])
        return x.numel() * 2 / best / 1e9
    finally:
        torch.set_num_threads(before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,64", help="latent sides (default 32,64)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 (bf16 only where oneDNN has native bf16)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per side (default 9)")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [d for d in (dict(fp32=torch.float32, bf16=torch.bfloat16)[n] for n in args.precisions.split(","))
              if d in ops.ONEDNN_GEMM]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape, dtype, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)  # noqa: E731
    # Maps channels-last, as sdlite's CPU UNet runs them (an NCHW map would add a reorder to each conv).
    rand_map = lambda *shape, dtype: rand(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    sections, totals = [], []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for hw in sizes:
            print(f"{name} {hw}x{hw}", file=sys.stderr, flush=True)
            shapes = step_shapes(hw)
            rows, saved = [], collections.Counter()
            for (tokens, c), n in sorted(shapes["qkv"].items()):
                x = rand(2, tokens, c, dtype=dtype)
                ws = [rand(c, c, dtype=dtype, scale=c ** -0.5) for _ in range(3)]
                three, one = [packed_linear(w) for w in ws], packed_linear(torch.cat(ws))
                old, new, diff = time_pair(lambda: [ops._gemm(x, w, None) for w in three],
                                           lambda: ops._gemm(x, one, None).split(c, -1), args.repeats)
                saved["qkv"] += n * (old - new)
                rows.append(f"| q, k, v as one product | x [2, {tokens}, {c}] @ 3 x [{c}, {c}] | {n} | {old:.2f} | "
                            f"{new:.2f} | {new / old:.2f} | {diff:.0e} |")
            for (c_h, c_skip, c_out, side), n in sorted(shapes["split"].items()):
                h, s = rand_map(2, c_h, side, side, dtype=dtype), rand_map(2, c_skip, side, side, dtype=dtype)
                w, b = rand(c_out, c_h + c_skip, 3, 3, dtype=dtype, scale=0.02), rand(c_out, dtype=dtype)
                def lay_out(w):  # packed for this input shape, as sdlite's packed convs are
                    return ops._reorder_conv(w, (1, 1), (1, 1), (1, 1), 1, (2, side, side))
                whole = lay_out(w)
                part_h, part_s = (lay_out(w[:, sl].contiguous()) for sl in (slice(0, c_h), slice(c_h, None)))
                old, new, diff = time_pair(lambda: conv(torch.cat([h, s], 1), whole, b),
                                           lambda: conv(h, part_h, b).add_(conv(s, part_s, None)), args.repeats)
                saved["split"] += n * (old - new)
                rows.append(f"| skip concatenation split | conv3x3 ({c_h} + {c_skip}) -> {c_out} @ {side}x{side} | {n} | "
                            f"{old:.2f} | {new:.2f} | {new / old:.2f} | {diff:.0e} |")
            for (c_in, c_out), n in sorted(shapes["small"].items()):
                x = rand_map(2, c_in, 4, 4, dtype=dtype)
                w, b = rand(c_out, c_in, 3, 3, dtype=dtype, scale=0.02), rand(c_out, dtype=dtype)
                as_conv, as_linear = ops._reorder_conv(w, (1, 1), (1, 1), (1, 1), 1, (2, 4, 4)), packed_linear(w.reshape(c_out, -1))
                old, new, diff = time_pair(lambda: conv(x, as_conv, b),
                                           lambda: im2col_gemm(x, as_linear, b, c_out), args.repeats)
                saved["small"] += n * (old - new)
                rows.append(f"| 4x4-map conv as im2col + GEMM | conv3x3 {c_in} -> {c_out} @ 4x4 | {n} | {old:.2f} | "
                            f"{new:.2f} | {new / old:.2f} | {diff:.0e} |")
            sections += [f"## {name}, {hw}x{hw} latents ({hw * 8}² images), batch 2", "",
                         "| lead | shape | calls per step | now, ms | the lead, ms | lead / now | max diff / max |",
                         "|---|---|---:|---:|---:|---:|---:|", *rows, ""]
            totals.append(f"| {name} | {hw}x{hw} | " + " | ".join(
                f"{saved[k]:.1f}" if shapes[k] else "—" for k in ("qkv", "split", "small")) + " |")
    bandwidth = {n: read_bandwidth(n) for n in sorted({1, torch.get_num_threads()})}
    out = [*bench.script_head("CPU leads not shipped: per-call timings on the shapes of one SD1.5 UNet step"),
           "- Memory read bandwidth (a bf16 sum over 512 MiB, best of 5): " + ", ".join(
               f"{gbs:.1f} GB/s on {n} thread{'s' if n > 1 else ''}" for n, gbs in bandwidth.items())
           + ". A 3x3 conv on a 4x4 map reads its bf16 weights (29.5 MB for 1280 -> 1280) once per call.",
           f"- Method: each shape the old and the new way alternating (ABBA), a warm-up round, then "
           f"{args.repeats} timed calls each; medians. Packed weights (oneDNN's layout), as `sdlite.load` gives "
           f"them; random inputs, maps channels-last as in sdlite's CPU UNet. *Calls per step*: how often one UNet step at batch 2 runs that shape.", "",
           "## Saved per UNet step, ms (positive: the lead is faster)", "",
           "| precision | latent | q, k, v as one product | skip concatenation split | 4x4-map convs as im2col + GEMM |",
           "|---|---|---:|---:|---:|", *totals, "", *sections]
    bench.print_or_write("\n".join(out), args.out)


if __name__ == "__main__":
    main()
