#!/usr/bin/env python
"""sdlite's CPU attention kernel (``sdlite/cpu_kernels.py``, ``sdlite/csrc/attention.cpp``) per call,
against the path ``sdlite.ops.attention`` takes without it (chunked oneDNN GEMMs for >= 1024 keys,
else SDPA), on the attention shapes of an SD1.5 generation (and SD2's 64-wide heads), for every
build of the kernel this CPU runs:

- the best build (AVX-512 here), in fp32 and, where the CPU has AVX512-BF16, bf16;
- the AVX2 build, in a child process with PyTorch, oneDNN and MKL held to AVX2
  (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``): what a CPU
  without AVX-512 runs, both sides limited alike.

Each shape alternates the two paths (``bench.alternate``: ABBA, a warm-up round, then
``--repeats`` timed calls each) and reports the medians and their ratio; the "pays" column is what
``cpu_kernels.pays`` decides (whether ``ops.attention`` takes the kernel for that shape).

Usage::

    python benchmarks/cpu_attention.py --out benchmarks/RESULTS-cpu-attention.md

Not a test: nothing here asserts. The whole networks with the kernel on and off are
``bench.py --levers`` rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import bench  # benchmarks/bench.py (it puts the repository root on sys.path): the alternating timer, machine facts
from sdlite import cpu_kernels, ops  # noqa: E402

# name, batch, heads, queries, keys, head width: batch 2 is CFG's; SD1.5 has 8 heads of 40-160 channels.
SHAPES = [
    ("UNet self-attention, 64x64 latent (512² image)", 2, 8, 4096, 4096, 40),
    ("UNet cross-attention, 64x64 latent", 2, 8, 4096, 77, 40),
    ("UNet self-attention, 32x32 latent", 2, 8, 1024, 1024, 80),
    ("UNet self-attention, 16x16 latent", 2, 8, 256, 256, 160),
    ("SD2 self-attention, 32x32 latent (5 heads of 64)", 2, 5, 1024, 1024, 64),
    ("VAE mid-block attention, 256² image (1 head of 512)", 1, 1, 1024, 1024, 512),
    ("VAE mid-block attention, 512² image", 1, 1, 4096, 4096, 512),
]


def measure(isa: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    kernel = cpu_kernels.load(isa)
    rows = []
    for name, b, h, length, keys, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        # the layout the UNet hands over: [B, L, heads, d] viewed as [B, heads, L, d]
        q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2) for n in (length, keys, keys))
        ops.FUSED_ATTENTION = ()  # ops.attention without the kernel; the kernel is called directly
        paths = {"kernel": lambda: cpu_kernels.attention(kernel, q, k, v), "without": lambda: ops.attention(q, k, v)}
        with torch.no_grad():
            times, _ = bench.alternate(paths, 1, repeats)
        a, w = (statistics.median(times[p]) for p in ("kernel", "without"))
        rows.append({"name": name, "shape": f"{b}x{h}x{length}x{keys}x{d}", "kernel_ms": a * 1e3,
                     "without_ms": w * 1e3, "pays": cpu_kernels.pays(kernel, keys, d, dtype)})
    return rows


def child(isa: str, dtypes: list[str], repeats: int) -> None:
    result = {"isa": isa, "capability": torch.backends.cpu.get_cpu_capability(), "tables": {}}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        result["tables"][name] = measure(isa, dtype, repeats)
    bench.report_to_parent(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=9, help="timed calls per path and shape (default 9)")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtypes", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.dtypes.split(","), args.repeats)

    runs = []
    for isa in cpu_kernels.isas():
        env = dict(os.environ)
        dtypes = ["fp32"]
        if isa == "avx512" and cpu_kernels.cpu_supported(torch.bfloat16):
            dtypes.append("bf16")
        if isa != cpu_kernels.isas()[0]:
            env.update(bench.AVX2_LIMITS)
        print(f"{isa}: {', '.join(dtypes)}", file=sys.stderr, flush=True)
        runs.append((isa, env, bench.run_again(__file__, ["--child", isa, "--dtypes", ",".join(dtypes),
                                                          "--repeats", str(args.repeats)], env)))

    out = [*bench.script_head("sdlite's CPU attention kernel, per call",
                              machine=f"; builds run: {', '.join(cpu_kernels.isas())}"),
           f"- Method: the kernel and the path without it alternate (ABBA), a warm-up round, then {args.repeats} "
           "timed calls each; medians. *kernel / without* below 1: the kernel is faster. *pays*: whether "
           "`ops.attention` takes the kernel for this shape (`cpu_kernels.pays`).", ""]
    for isa, env, result in runs:
        limits = " ".join(f"{k}={env[k]}" for k in bench.ISA_LIMITS if env.get(k))
        for dtype, rows in result["tables"].items():
            out += [f"## {isa} build, {dtype} (PyTorch's CPU capability {result['capability']}"
                    + (f"; {limits}" if limits else "") + ")", "",
                    "| shape | B x heads x queries x keys x d | kernel, ms | without, ms | kernel / without | pays |",
                    "|---|---|---:|---:|---:|---|"]
            out += [f"| {r['name']} | {r['shape']} | {r['kernel_ms']:.1f} | {r['without_ms']:.1f} | "
                    f"{r['kernel_ms'] / r['without_ms']:.2f} | {'yes' if r['pays'] else 'no'} |" for r in rows]
            out.append("")
    text = "\n".join(out)
    bench.print_or_write(text, args.out)


if __name__ == "__main__":
    main()
