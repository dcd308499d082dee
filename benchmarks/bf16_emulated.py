#!/usr/bin/env python
"""bf16 weights on an AVX-512 CPU without AVX512-BF16 (Intel's Xeons from Skylake to Ice Lake, its
Ice Lake and Tiger Lake laptops), measured on this project's CPU with oneDNN held to the instruction
set of such a CPU (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``; the script re-runs itself with it set).

There oneDNN still has bf16 kernels, but emulates bf16 with fp32 instructions. sdlite computes bf16
weights in fp32 on such a CPU (``sdlite.devices.cpu_has_native_bf16``, ``ops.HALF_AS_FP32``); until
session 21 it took oneDNN's emulated bf16 kernels, as PyTorch and diffusers do. One UNet step
(SD1.5 size, batch 2) in one process, alternating (``bench.alternate``, ABBA-style rounds):

- sdlite fp32, and diffusers fp32;
- sdlite bf16 weights, as it runs them now on such a CPU (computed in fp32);
- sdlite bf16 weights on oneDNN's emulated bf16 kernels (its policy there before session 21);
- diffusers bf16 weights (oneDNN's emulated bf16 kernels).

Usage::

    python benchmarks/bf16_emulated.py --out benchmarks/RESULTS-bf16-emulated.md

Not a test: nothing here asserts. ``tests/test_devices.py`` checks the policy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from unittest import mock

import torch

import bench  # benchmarks/bench.py (it puts the repository root on sys.path)
from sdlite import cpu_kernels, devices, ops  # noqa: E402

LIMIT = "AVX512_CORE"


@contextlib.contextmanager
def onednn_bf16_policy() -> Iterator[None]:
    """sdlite's policy before session 21 on such a CPU: bf16 on oneDNN's (emulated) bf16 kernels."""
    with mock.patch.object(ops, "HALF_AS_FP32", ops.HALF_AS_FP32 - {torch.bfloat16}), \
            mock.patch.object(ops, "ONEDNN_GEMM", ops.ONEDNN_GEMM | {torch.bfloat16}):
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,64", help="latent sides (default 32,64)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3, after a warm-up round)")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    args = p.parse_args()
    if os.environ.get("ONEDNN_MAX_CPU_ISA") != LIMIT:
        if "avx512" not in cpu_kernels.isas():
            sys.exit("this CPU has no AVX-512: there is nothing to hold oneDNN to")
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": LIMIT}
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    assert torch.bfloat16 in ops.HALF_AS_FP32 and not cpu_kernels.cpu_supported(torch.bfloat16), \
        "with oneDNN held below bf16, sdlite must compute bf16 in fp32"

    cfg = bench.SIZES["sd15"]
    weights = bench.random_original_weights(cfg)
    nets32 = bench.sdlite_networks(cfg, weights, torch.float32)
    dnets32 = bench.diffusers_networks(cfg, nets32)
    ours16 = bench.sdlite_networks(cfg, weights, torch.bfloat16)["unet"]
    with onednn_bf16_policy():
        old16 = bench.sdlite_networks(cfg, weights, torch.bfloat16)["unet"]  # packed under that policy
    theirs16 = bench.diffusers_unet(cfg.unet, {k: v.bfloat16() for k, v in weights["unet"].items()})
    peaks = {name: max(bench.matmul_peaks(dtype, 2048).values())[0]
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    rows = []
    for hw in (int(s) for s in args.sizes.split(",")):
        print(f"{hw}x{hw}", file=sys.stderr, flush=True)
        g = torch.Generator().manual_seed(hw)
        x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=g)
        ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=g)
        t = torch.tensor([500.0, 500.0])
        xb, cb = x.bfloat16(), ctx.bfloat16()

        def old() -> torch.Tensor:
            with onednn_bf16_policy():
                return old16(xb, t, cb)

        calls = {"sdlite fp32": lambda: nets32["unet"](x, t, ctx),
                 "sdlite bf16 (computed in fp32)": lambda: ours16(xb, t, cb),
                 "sdlite bf16 (oneDNN's emulated bf16, before session 21)": old,
                 "diffusers fp32": lambda: dnets32["unet"](x, t, encoder_hidden_states=ctx).sample,
                 "diffusers bf16 (oneDNN's emulated bf16)": lambda: theirs16(xb, t, encoder_hidden_states=cb).sample}
        with torch.no_grad():
            times, last = bench.alternate(calls, 1, args.repeats)
        base = statistics.median(times["sdlite fp32"])
        for name, ts in times.items():
            m = statistics.median(ts)
            rows.append(f"| {hw}x{hw} | {name} | {m:.2f} | {m / base:.2f} | "
                        f"{bench.rel_diff(last[name].float(), last['sdlite fp32']):.1e} |")

    out = [*bench.script_head(f"bf16 weights on an AVX-512 CPU without AVX512-BF16 (oneDNN held to {LIMIT}): one "
                              "UNet step", machine=f"; `ONEDNN_MAX_CPU_ISA={LIMIT}`: native bf16 per sdlite: "
                                                   f"{devices.cpu_has_native_bf16()}"),
           f"- Matmul peak under that limit: {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16 (oneDNN's "
           "emulated bf16).",
           f"- Method: SD1.5-size UNet, seeded random weights, batch 2; the five calls alternate, a warm-up round, "
           f"then {args.repeats} rounds; medians. *rel. diff*: max |Δ| / max |sdlite fp32|.", "",
           "| latent | call | median, s | / sdlite fp32 | rel. diff |", "|---|---|---:|---:|---:|", *rows]
    bench.print_or_write("\n".join(out), args.out)


if __name__ == "__main__":
    main()
