#!/usr/bin/env python
"""sdlite's Triton kernels (``sdlite/kernels.py``): what Triton's compiles of the GroupNorm kernels
cost, and their GPU time, side by side with another version of that file and with PyTorch's
group_norm; then the GELU product of GEGLU against PyTorch's two passes; then where the host time
of an eager UNet call goes with and without the GroupNorm kernels.

The calls are every distinct GroupNorm call of an SD1.5-size fp16 generation at 512x512: the UNet's
at batch 2 (CFG; channels-last maps, as sdlite runs it on CUDA) and the VAE decode's (NCHW). For each
version of the kernels:

- in a fresh process with an empty Triton cache (``TRITON_CACHE_DIR``), then in another one with the
  cache the first filled: the time of the first pass over those calls (Triton builds, or loads, a
  variant of a kernel per new set of compile-time constants), of the second pass, and the number
  of compiled kernels in the cache;
- in this process, the GPU time of each network's GroupNorm calls summed (each call 20x in a CUDA
  graph: no launch cost), the versions and PyTorch's group_norm + SiLU alternating, ``--rounds``
  rounds, median.

Usage (on a machine with CUDA and Triton)::

    git show ddc5c43:sdlite/kernels.py > /tmp/kernels_before.py   # e.g. the kernels before session 17
    python benchmarks/kernel_variants.py --baseline /tmp/kernels_before.py --out benchmarks/RESULTS-cuda-kernels.md

Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any
from unittest.mock import patch

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_cuda  # noqa: E402

CURRENT = "sdlite/kernels.py"


def load_kernels(path: str) -> ModuleType:
    """The kernels module at ``path``: sdlite's own for ``CURRENT``, else that file as a module of its own."""
    if path == CURRENT:
        from sdlite import kernels
        return kernels
    spec = importlib.util.spec_from_file_location(f"kernels_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(calls: list[list], device: torch.device) -> list[tuple]:
    """Seeded fp16 maps, weights and biases for ``calls`` ([shape, channels_last, groups, eps, silu])."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, channels_last, groups, eps, silu in calls:
        x = torch.randn(shape, generator=gen).to(device, torch.float16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = (1 + 0.1 * torch.randn(shape[1], generator=gen)).to(device, torch.float16)
        b = (0.1 * torch.randn(shape[1], generator=gen)).to(device, torch.float16)
        out.append((x, groups, w, b, eps, silu))
    return out


def child(path: str, calls_json: str) -> None:
    """In a fresh process: the first and second pass over the calls, and what Triton's cache holds."""
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    kernels = load_kernels(path)
    maps = inputs(json.loads(calls_json), device)

    def one_pass() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, groups, w, b, eps, silu in maps:
            kernels.group_norm(x, groups, w, b, eps, silu)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    first, second = one_pass(), one_pass()
    cache = pathlib.Path(os.environ["TRITON_CACHE_DIR"])
    compiled = sum(1 for f in cache.rglob("*") if f.suffix in (".cubin", ".hsaco"))
    print(json.dumps({"first_s": first, "second_s": second, "compiled": compiled}))


def compile_costs(path: str, calls: list[list]) -> dict[str, dict]:
    """``child`` with an empty Triton cache, then with the one it filled."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        for run in ("empty cache", "filled cache"):
            proc = subprocess.run([sys.executable, __file__, "--child", path, json.dumps(calls)],
                                  env={**os.environ, "TRITON_CACHE_DIR": cache}, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{path}, {run}: {proc.stderr[-2000:]}")
            out[run] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# GEGLU in SD1.5's UNet at 64x64 latents: (tokens per sample, width of a and g, GEGLUs per UNet call).
GEGLU_CALLS = ((4096, 1280, 5), (1024, 2560, 5), (256, 5120, 5), (64, 5120, 1))


def gelu_lines(device: torch.device, time_us: Callable[[Callable[[], Any]], float], batches: Sequence[int] = (2, 16),
               calls: Sequence[tuple[int, int, int]] = GEGLU_CALLS) -> list[str]:
    """GEGLU's ``a * gelu(g)`` (fp16), sdlite's kernel (``kernels.gelu_product_``) against ``F.gelu``
    then the product in place (what ``ops.gelu_product`` runs without it): ``time_us(fn)`` per call,
    and summed over the UNet call's GEGLUs."""
    from sdlite import kernels

    gen = torch.Generator().manual_seed(7)
    out = ["| batch | tokens x width | per UNet call | fused µs | F.gelu + product µs | fused / PyTorch "
           "| max abs. error vs fp32 (fused, PyTorch) |", "|---:|---|---:|---:|---:|---:|---|"]
    for batch in batches:
        fused_total = plain_total = 0.0
        for tokens, width, count in calls:
            a = torch.randn(batch, tokens, width, generator=gen).to(device, torch.float16)
            g = (2 * torch.randn(batch, tokens, width, generator=gen)).to(device, torch.float16)
            exact = a.float() * F.gelu(g.float())
            errors = [(y.float() - exact).abs().max().item()
                      for y in (kernels.gelu_product_(a.clone(), g), F.gelu(g).mul_(a))]
            # Timed on the same tensors again and again: the fused side overwrites a (the values
            # drift; the kernel's time does not depend on them).
            fused, plain = time_us(lambda: kernels.gelu_product_(a, g)), time_us(lambda: F.gelu(g).mul_(a))
            fused_total, plain_total = fused_total + count * fused, plain_total + count * plain
            out.append(f"| {batch} | {tokens}x{width} | {count} | {fused:.1f} | {plain:.1f} | {fused / plain:.2f} "
                       f"| {errors[0]:.1e}, {errors[1]:.1e} |")
            print(out[-1], flush=True)
        out.append(f"| {batch} | **all of a UNet call** | | **{fused_total:,.0f}** | **{plain_total:,.0f}** "
                   f"| **{fused_total / plain_total:.2f}** | |")
        print(out[-1], flush=True)
    return out


def eager_lines(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                sync: Callable[[], None], rounds: int = 10) -> list[str]:
    """An eager UNet call (CUDA graphs off) with the fused GroupNorm kernels and with PyTorch's,
    alternating: its wall time (synchronised), and the host time spent inside its ``ops.group_norm``
    calls and inside its convolutions (not synchronised: the GPU runs behind). An eager batch-2 call
    is bound by the host and took 1.10-1.20x as long with the kernels (sessions 16-17), though one
    GroupNorm call's host time on a small map was the same on both sides. This tells whether the
    gap is in those calls, or elsewhere: the convolutions after a norm get a channels-last map from
    the kernels and an NCHW one from PyTorch's group_norm, which may cost cuDNN's host side more."""
    from sdlite import ops

    spent = {"group_norm": 0.0, "conv": 0.0}

    def timed(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(*args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return call

    sides = {"fused kernels": ("cuda",), "PyTorch group_norm + SiLU": ()}
    wall: dict[str, list[float]] = {name: [] for name in sides}
    inside: dict[str, dict[str, list[float]]] = {name: {k: [] for k in spent} for name in sides}
    with torch.no_grad(), patch.object(ops, "group_norm", timed("group_norm", ops.group_norm)), \
            patch.object(ops.Conv2d, "_conv_forward", timed("conv", ops.Conv2d._conv_forward)):
        for round_ in range(rounds + 1):  # the first round warms up
            for name, devices in sides.items():
                with patch.object(ops, "FUSED_GROUP_NORM", devices):
                    sync()
                    spent.update(group_norm=0.0, conv=0.0)
                    t0 = time.perf_counter()
                    unet(x, t, ctx)
                    sync()
                    if round_:
                        wall[name].append((time.perf_counter() - t0) * 1e3)
                        for k, v in spent.items():
                            inside[name][k].append(v * 1e3)
    out = ["| eager UNet call | wall ms | host ms inside ops.group_norm | host ms inside the convolutions "
           "| rest ms |", "|---|---:|---:|---:|---:|"]
    for name in sides:
        w = statistics.median(wall[name])
        g, c = (statistics.median(inside[name][k]) for k in ("group_norm", "conv"))
        out.append(f"| {name} | {w:.2f} | {g:.2f} | {c:.2f} | {w - g - c:.2f} |")
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="another version of sdlite/kernels.py to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--commit", default=None, help="the commit measured (when the tree has no .git)")
    p.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "RESULTS-cuda-kernels.md"))
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_variants.py measures Triton's CUDA kernels: it needs a CUDA GPU.")

    started = time.time()
    device = torch.device("cuda")
    cfg = bench.SIZES["sd15"]
    nets = bench.sdlite_networks(cfg, bench.random_original_weights(cfg), torch.float32)
    nets = {k: m.to(device, torch.float16) for k, m in nets.items()}
    nets["unet"].to(memory_format=torch.channels_last)  # as sdlite.load does on CUDA
    workloads = bench_cuda.group_norm_workloads(cfg, nets, device)
    # A 512x512 generation: the UNet's calls at batch 2 and the VAE's (batch 16 needs the same variants).
    calls = [list(key) for name in ("UNet, batch 2", "VAE decode") for key in workloads[name]]

    versions = {"sdlite/kernels.py": CURRENT}
    if args.baseline:
        versions[f"baseline ({pathlib.Path(args.baseline).name})"] = args.baseline
    lines = ["| kernels | empty cache: first pass, s | compiled kernels | filled cache: first pass, s "
             "| second pass, ms |", "|---|---:|---:|---:|---:|"]
    for name, path in versions.items():
        cost = compile_costs(path, calls)
        empty, filled = cost["empty cache"], cost["filled cache"]
        lines.append(f"| {name} | {empty['first_s']:.2f} | {empty['compiled']} | {filled['first_s']:.2f} "
                     f"| {filled['second_s'] * 1e3:.1f} |")
        print(lines[-1], flush=True)

    modules = {name: load_kernels(path) for name, path in versions.items()}

    sides = {**modules, "PyTorch group_norm + SiLU": None}
    times = {(w, s): [] for w in workloads for s in sides}
    for _ in range(args.rounds):
        for w, calls_of in workloads.items():
            for s, kernels in sides.items():
                times[(w, s)].append(bench_cuda.group_norm_us(calls_of, device, kernels))
    first = next(iter(sides))
    gpu = ["| GroupNorm calls of | " + " | ".join(f"{s}, µs" for s in sides) + " | "
           + " | ".join(f"{s} / {first}" for s in list(sides)[1:]) + " |",
           "|---|" + "---:|" * (2 * len(sides) - 1)]
    for w in workloads:
        med = {s: statistics.median(times[(w, s)]) for s in sides}
        gpu.append(f"| {w} ({sum(c[0] for c in workloads[w].values())} calls, {len(workloads[w])} distinct) | "
                   + " | ".join(f"{med[s]:,.0f}" for s in sides) + " | "
                   + " | ".join(f"{med[s] / med[first]:.3f}" for s in list(sides)[1:]) + " |")
        print(gpu[-1], flush=True)

    try:
        gelu = gelu_lines(device, lambda fn: bench_cuda.graph_time_us(fn, device))
    except Exception:  # noqa: BLE001 - keep the GroupNorm results
        gelu = ["```", traceback.format_exc(), "```"]
    try:
        gen = torch.Generator().manual_seed(6)
        x = torch.randn(2, cfg.unet.in_channels, 64, 64, generator=gen).to(device, torch.float16)
        ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, torch.float16)
        eager = eager_lines(nets["unet"], x, torch.full((2,), 500.0, device=device), ctx, torch.cuda.synchronize)
    except Exception:  # noqa: BLE001
        eager = ["```", traceback.format_exc(), "```"]

    props = torch.cuda.get_device_properties(device)
    import triton

    report = [
        "# sdlite's Triton kernels: compile cost and GPU time", "",
        f"- Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"(run took {(time.time() - started) / 60:.1f} min)",
        f"- Command: `python benchmarks/kernel_variants.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Device: {props.name}; torch {torch.__version__}, Triton {triton.__version__}; "
        f"sdlite commit {args.commit or bench.git_commit()}",
        f"- Calls: the {len(calls)} distinct GroupNorm calls of an SD1.5-size fp16 512x512 generation (UNet batch 2, "
        "channels-last maps; VAE decode, NCHW), seeded random weights.", "",
        "## Triton's compiles", "",
        "Each version in a fresh process with an empty Triton cache, then in another with the cache the first "
        "filled: the first pass over the calls (building or loading the kernels' variants), and the second.", "",
        *lines, "",
        "## GPU time", "",
        f"Each network's GroupNorm calls summed, each call 20x in a CUDA graph (no launch cost); the sides "
        f"alternating, median of {args.rounds} rounds.", "",
        *gpu, "",
        "## The GELU product of GEGLU", "",
        "sdlite's kernel (`ops.FUSED_GELU`, off by default until measured) against `F.gelu` then the product, "
        "fp16, on the shapes of SD1.5's GEGLUs at 64x64 latents; GPU time per call, each call 20x in a CUDA graph.",
        "", *gelu, "",
        "## The eager UNet call (graphs off), batch 2, 64x64", "",
        "Alternating, 10 rounds after one of warm-up, medians; the host time inside the GroupNorm calls and "
        "the convolutions is measured without synchronising (the GPU runs behind the host).", "",
        *eager, "",
    ]
    pathlib.Path(args.out).write_text("\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
