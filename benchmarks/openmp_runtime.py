#!/usr/bin/env python
"""Why sdlite's CPU attention kernel is linked against PyTorch's own OpenMP runtime
(``sdlite.cpu_kernels.openmp_runtime``): a whole fp32 UNet step (SD1.5 size, batch 2) with the kernel
on the runtime PyTorch runs on, with the kernel on a second runtime, and without the kernel.

A process with two OpenMP runtimes has two thread pools, each spin-waiting on the same cores after
its parallel regions. That is what happened where PyTorch's runtime and the compiler's default one
differ (conda's MKL builds run on Intel's libiomp5, some pip wheels on a libgomp under a hashed
name) while the kernel was linked with ``-fopenmp`` alone. This script makes that second runtime on
purpose: the kernel linked against the library given by ``--second-runtime`` (for example Intel's,
from ``pip download intel-openmp --no-deps`` and its wheel unzipped: ``.../data/lib/libiomp5.so``),
in a process where PyTorch runs on its own.

Each configuration runs in its own process (a runtime, once loaded, stays), in rotating order for
``--rounds`` rounds; each process times ``--repeats`` calls after a warm-up one (median).

Usage::

    python benchmarks/openmp_runtime.py --second-runtime /path/to/libiomp5.so --out benchmarks/RESULTS-openmp-runtime.md

Not a test: nothing here asserts. ``tests/test_cpu_kernels.py`` checks that the kernel is linked
against PyTorch's runtime and adds no other.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import bench  # benchmarks/bench.py (it puts the repository root on sys.path): weights, machine facts
from sdlite import cpu_kernels, ops  # noqa: E402

CONFIGS = {
    "kernel, PyTorch's runtime": "ours",
    "kernel, a second runtime": "second",
    "no kernel (PyTorch's ops)": "none",
}


def child(library: str, second_runtime: str | None, hw: int, repeats: int) -> None:
    if second_runtime:  # loaded as PyTorch's own runtime is, for the kernel linked against it to find
        ctypes.CDLL(second_runtime, mode=ctypes.RTLD_GLOBAL)
    if library == "none":
        ops.FUSED_ATTENTION = ()
    else:
        kernel = cpu_kernels._Kernel(Path(library), cpu_kernels.isas()[0])
        cpu_kernels.load = lambda isa=None: kernel  # what ops.attention asks for
    cfg = bench.SIZES["sd15"]
    unet = bench.sdlite_networks(cfg, bench.random_original_weights(cfg), torch.float32)["unet"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=g), torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            unet(x, t, ctx)
            if i:
                times.append(time.perf_counter() - start)
    bench.report_to_parent({"times": times, "runtimes": [str(p) for p in cpu_kernels.openmp_runtimes()]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--second-runtime", required=True, help="an OpenMP runtime library other than PyTorch's")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32: a 256² image)")
    p.add_argument("--rounds", type=int, default=2, help="processes per configuration (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (default 5)")
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-second", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.second_runtime if args.load_second else None, args.size, args.repeats)
    if not cpu_kernels.isas():
        sys.exit("this CPU runs no build of the kernel")

    work = Path(tempfile.mkdtemp(prefix="sdlite-openmp-"))
    second = Path(args.second_runtime).resolve()
    libraries = {"ours": str(cpu_kernels.build(work / "ours")), "none": "none"}
    with mock.patch.object(cpu_kernels, "openmp_runtime", lambda: second):
        libraries["second"] = str(cpu_kernels.build(work / "second"))

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated each round
            print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
            extra = ["--load-second"] if CONFIGS[name] == "second" else []
            results[name].append(bench.run_again(__file__, [
                "--second-runtime", str(second), "--child", libraries[CONFIGS[name]], "--size", str(args.size),
                "--repeats", str(args.repeats), *extra]))

    ours = statistics.median(t for res in results["kernel, PyTorch's runtime"] for t in res["times"])
    out = [*bench.script_head(f"The attention kernel's OpenMP runtime: a whole fp32 UNet step, {args.size}x{args.size} "
                              "latent, batch 2", machine=f"; build {cpu_kernels.isas()[0]}",
                              versions=f"; PyTorch's OpenMP runtime: `{cpu_kernels.openmp_runtime()}`"),
           f"- Method: one process per configuration and round ({args.rounds} rounds, rotated order), SD1.5-size "
           f"UNet with seeded random weights, a warm-up call, then {args.repeats} timed calls each; median over "
           "all of a configuration's calls, and each process's median.",
           "",
           "| configuration | OpenMP runtimes in the process | median, s | per process, s | / kernel on PyTorch's runtime |",
           "|---|---|---:|---:|---:|"]
    for name, runs in results.items():
        times = [t for res in runs for t in res["times"]]
        loaded = "; ".join(sorted({Path(p).name for res in runs for p in res["runtimes"]}))
        per = ", ".join(f"{statistics.median(res['times']):.3f}" for res in runs)
        out.append(f"| {name} | {loaded} | {statistics.median(times):.3f} | {per} | "
                   f"{statistics.median(times) / ours:.2f} |")
    text = "\n".join(out) + "\n"
    bench.print_or_write(text, args.out)


if __name__ == "__main__":
    main()
