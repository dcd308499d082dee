#!/usr/bin/env python
"""Load time, first and later UNet steps, and peak RSS, each run in a fresh process: sdlite's conv
weights laid out at their first call (``sdlite.ops.Conv2d.pack``) against the way before session
28, every conv packed at load for a placeholder input shape, (1, 8, 8), and packed again (or turned
back into the plain weight Winograd reads) at the first step.

What a user waits for before the first step is done: ``sdlite.load`` of an SD1.5-size checkpoint
(seeded random weights in the original layout, written once; fp16 like v1-5-pruned-emaonly, or fp32
with ``--file-dtype fp32``), then UNet steps at batch 2 (CFG). The two ways alternate, one process
each, ``--runs`` times.

Usage::

    python benchmarks/first_step.py --out benchmarks/RESULTS-first-step.md

Not a test: nothing here asserts. ``tests/test_ops.py`` checks that a conv is laid out once per
input shape and computes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench  # benchmarks/bench.py (it puts the repository root on sys.path)

WAYS = {"at_load": "every conv packed at load for (1, 8, 8) (before session 28)",
        "first_call": "each conv laid out at its first call (sdlite now)"}


def child(spec: dict) -> None:
    import sdlite
    from sdlite import ops

    torch.set_num_threads(spec["threads"])
    if spec["way"] == "at_load":
        lazy_pack = ops.Conv2d.pack

        def pack_at_load(conv: ops.Conv2d) -> int:
            """What Conv2d.pack did before: the weight laid out at once, for a placeholder shape, as
            the loader reads each layer. (A meta input: no Winograd, oneDNN's layout for that shape.
            _laid_out_for counts the replaced bytes for its own releases; the loader drops the file
            pages of a replaced weight.)"""
            nbytes = lazy_pack(conv)
            if conv.packed and not conv._pointwise():
                conv._laid_out_for(torch.empty(1, conv.in_channels, 8, 8, device="meta"))
            return nbytes

        ops.Conv2d.pack = pack_at_load
    t0 = time.perf_counter()
    pipe = sdlite.load(spec["ckpt"], device="cpu", dtype="fp32")
    load_s = time.perf_counter() - t0
    load_peak = bench._peak_mib()
    convs = [m for net in (pipe.unet, pipe.vae, pipe.text_encoder) for m in net.modules()
             if isinstance(m, ops.Conv2d) and m.packed and not m._pointwise()]
    laid_out = sum(m._packed_for != () for m in convs)  # 3x3 convs laid out before any call
    hw = spec["hw"]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, hw, hw, generator=g), torch.randn(2, 77, pipe.config.unet.context_dim, generator=g)
    t = torch.tensor([500, 500])
    steps = []
    with torch.inference_mode():
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            pipe.unet(x, t, c)
            steps.append(time.perf_counter() - t0)
    bench.report_to_parent({"load_s": load_s, "load_peak": load_peak, "steps": steps, "peak": bench._peak_mib(),
                            "laid_out_at_load": f"{laid_out} of {len(convs)}"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=3, help="processes per way (default 3)")
    p.add_argument("--steps", type=int, default=3, help="UNet steps per process (default 3)")
    p.add_argument("--hw", type=int, default=64, help="latent side (default 64: 512x512 images)")
    p.add_argument("--file-dtype", choices=("fp16", "fp32"), default="fp16", help="the checkpoint's dtype")
    p.add_argument("--ckpt", default=None, help="an SD1 checkpoint to load (default: write a random one)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            cfg = bench.SIZES["sd15"]
            ckpt = str(Path(tmp) / "sd15-original-fp16.safetensors")
            print(f"writing {ckpt}", file=sys.stderr, flush=True)
            bench.write_checkpoint(cfg, bench.random_original_weights(cfg), Path(ckpt))
            if args.file_dtype == "fp32":
                from safetensors.torch import load_file, save_file
                fp32 = str(Path(tmp) / "sd15-original-fp32.safetensors")
                save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(ckpt).items()}, fp32)
                os.remove(ckpt)
                ckpt = fp32
        results: dict[str, list[dict]] = {way: [] for way in WAYS}
        for run in range(args.runs):
            for way in (WAYS if run % 2 == 0 else reversed(WAYS)):
                spec = {"ckpt": ckpt, "way": way, "hw": args.hw, "steps": args.steps, "threads": args.threads}
                res = bench.run_spec(__file__, spec, dict(os.environ), timeout=1800)
                if "error" in res:
                    raise SystemExit(f"{way}: {res['error']}")
                print(f"{way}: {res}", file=sys.stderr, flush=True)
                results[way].append(res)
    lines = bench.script_head("Load and first UNet step: conv weights laid out at load or at their first call") + [
        f"- Checkpoint: {'an SD1.5-size ' + args.file_dtype + ' file with seeded random weights' if args.ckpt is None else ckpt}"
        f", loaded into fp32; UNet steps at batch 2, {args.hw}x{args.hw} latents; {args.runs} fresh processes "
        f"per way, alternating; medians, with the range", "",
        "| way | convs laid out at load | load s | first step s | later steps s | peak RSS after load MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|"]

    def cell(values: list[float], fmt: str = ".2f") -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    for way, runs in results.items():
        later = [s for r in runs for s in r["steps"][1:]]
        lines.append(f"| {WAYS[way]} | {runs[0]['laid_out_at_load']} | {cell([r['load_s'] for r in runs])} | {cell([r['steps'][0] for r in runs])} | "
                     f"{cell(later) if later else '—'} | {cell([r['load_peak'] for r in runs], '.0f')} | "
                     f"{cell([r['peak'] for r in runs], '.0f')} |")
    bench.print_or_write("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
