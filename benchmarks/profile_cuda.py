#!/usr/bin/env python
"""Where the GPU time of one fp16 UNet call goes, sdlite against diffusers (same weights).

``torch.profiler`` over a few eager calls of the SD1.5 UNet (64x64 latents) on each side, printed as
the top operators and kernels by GPU time. Eager, not graph-replayed, so that the profiler sees each
kernel; a CUDA graph replays the same kernels. Not a test; a companion of ``bench_cuda.py``.

    python benchmarks/profile_cuda.py --batch 16 --out /tmp/profile-cuda.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench import SIZES  # noqa: E402

from sdlite import devices  # noqa: E402


def profiled(fn: Callable[[], Any], calls: int, rows: int) -> str:
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    avg = prof.key_averages()
    try:
        return avg.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
    except (AttributeError, KeyError):  # newer torch names it after the device
        return avg.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hw", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--out", default="/tmp/profile-cuda.txt")
    args = p.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    cfg = SIZES["sd15"]
    nets = bench.sdlite_networks(cfg, bench.random_original_weights(cfg), torch.float32)
    dunet = bench.diffusers_networks(cfg, nets)["unet"].to(dev, dtype)
    unet = nets["unet"].to(dev, dtype).to(memory_format=devices.unet_memory_format(dev))  # as sdlite.load
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.unet.in_channels, args.hw, args.hw, generator=g).to(dev, dtype)
    ctx = torch.randn(args.batch, cfg.text.max_length, cfg.unet.context_dim, generator=g).to(dev, dtype)
    t = torch.full((args.batch,), 500.0, device=dev)

    def ours_autocast() -> Any:
        with torch.autocast("cuda", dtype=torch.float16):
            return unet(x, t, ctx)

    cases = {
        "sdlite, fp16 weights (its CUDA default)": lambda: unet(x, t, ctx),
        "sdlite, fp16 weights under fp16 autocast (its CUDA policy before)": ours_autocast,
        "diffusers, plain fp16 weights": lambda: dunet(x, t, encoder_hidden_states=ctx).sample,
    }
    out = [f"UNet call, batch {args.batch}, {args.hw}x{args.hw} latents, {args.calls} calls each; "
           f"{torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    for name, fn in cases.items():
        out += [f"=== {name} ===", profiled(fn, args.calls, args.rows), ""]
        print("\n".join(out[-3:]), flush=True)
        Path(args.out).write_text("\n".join(out))


if __name__ == "__main__":
    main()
