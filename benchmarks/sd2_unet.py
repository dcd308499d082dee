#!/usr/bin/env python
"""The SD2 768-v UNet (``sdlite.SD2_V``: 5-20 heads of 64 channels, linear projections in its
transformers, a 1024-wide OpenCLIP context), one step at batch 2, sdlite against diffusers with the
same seeded random weights (diffusers' own converter of the original layout), at 64x64 latents and at
96x96, the native 768x768 images of SD2-v. ``bench.py`` measures SD1.5; this is the same method on
SD2's shapes: alternating ABBA (``bench.alternate``), a warm-up round, medians, and each step's
FLOPs (counted on the meta device) against the matmul peak measured in the same run.

Usage::

    python benchmarks/sd2_unet.py --out benchmarks/RESULTS-sd2.md

Not a test: nothing here asserts. ``tests/test_unet.py`` checks SD2's numerics against diffusers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

import torch

import bench  # benchmarks/bench.py (it puts the repository root on sys.path)
from sdlite import SD2_V, ops  # noqa: E402
from sdlite.unet.model import UNetModel  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,96", help="latent sides (default 64,96)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16 (default both)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (default 3)")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = SD2_V.unet
    peaks = {name: max(bench.matmul_peaks(dtype, 4096).values())[0] for name, dtype in PRECISIONS.items()}
    weights = {k: v.clone() for k, v in bench.random_state_dict(UNetModel(cfg), 0).items()}
    # FLOPs as in bench.network_flops: the Upsample convs counted as written, the same for both libraries.
    with torch.device("meta"), mock.patch.object(ops, "UPSAMPLE_BY_PHASES", ()):
        meta = UNetModel(cfg)
        flops = {hw: bench.count_flops(lambda: meta(torch.zeros(2, cfg.in_channels, hw, hw), torch.zeros(2),
                                                    torch.zeros(2, 77, cfg.context_dim))) for hw in sizes}

    rows = []
    for name in args.precisions.split(","):
        dtype = PRECISIONS[name]
        ours = UNetModel(cfg)
        ours.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
        ops.pack(ours.eval().requires_grad_(False))  # as sdlite.load does on the CPU
        theirs = bench.diffusers_unet(cfg, {k: v.to(dtype) for k, v in weights.items()})
        for hw in sizes:
            print(f"{name} {hw}x{hw}", file=sys.stderr, flush=True)
            g = torch.Generator().manual_seed(hw)
            x = torch.randn(2, cfg.in_channels, hw, hw, generator=g).to(dtype)
            ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
            t = torch.tensor([500.0, 500.0])
            with torch.no_grad():
                times, last = bench.alternate({"sdlite": lambda: ours(x, t, ctx),
                                               "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx).sample},
                                              1, args.repeats)
            m = {side: statistics.median(v) for side, v in times.items()}
            share = {side: flops[hw] / m[side] / 1e9 / peaks[name] for side in m}
            rows.append(f"| {name} | {hw}x{hw} ({hw * 8}²) | {m['sdlite']:.2f} | {m['diffusers']:.2f} | "
                        f"{m['sdlite'] / m['diffusers']:.2f} | {share['sdlite']:.0%} / {share['diffusers']:.0%} | "
                        f"{bench.rel_diff(last['sdlite'], last['diffusers']):.1e} |")

    out = [*bench.script_head("The SD2 768-v UNet: sdlite vs diffusers, one step at batch 2"),
           f"- Method: seeded random weights in the original layout, the same tensors in both libraries; "
           f"ABBA, a warm-up round, then {args.repeats} timed calls each; medians. Matmul peak measured at the "
           f"start of the run: {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16. "
           + "; ".join(f"{hw}x{hw}: {flops[hw] / 1e9:.0f} GFLOP per step" for hw in sizes) + ".", "",
           "| precision | latent (image) | sdlite, s | diffusers, s | sdlite / diffusers | % of matmul peak, sdlite / diffusers | max abs. diff / max abs. |",
           "|---|---|---:|---:|---:|---:|---:|", *rows]
    bench.print_or_write("\n".join(out), args.out)


if __name__ == "__main__":
    main()
