#!/usr/bin/env python
"""sdlite and diffusers side by side on a CUDA GPU, with the same weights, in one run.

The GPU counterpart of ``bench.py`` (which it imports: the same seeded random SD1.5-size weights in
the original layout, the same conversion into diffusers, the same ABBA alternation, the same report
table). Every call is followed by ``torch.cuda.synchronize()`` inside the timed region, so the
times are wall-clock milliseconds of finished GPU work, Python overhead included.

Precisions, each side at its own documented default for that request:

- ``fp16``: sdlite's CUDA default (fp16 weights, what ``sdlite.load(device="cuda")`` gives) vs
  diffusers' usual ``torch_dtype=torch.float16``;
- ``bf16``: bf16 weights on both sides;
- ``autocast``: fp32 weights on both sides, both under ``torch.autocast("cuda", float16)``.

Rows: text encoder (batch 2 x 77); one UNet call at batch 2 for 64x64 and 32x32 latents; VAE decode
of a 64x64 latent; txt2img 256x256 (10 Euler steps) and 512x512 (20 Euler steps), CFG 7.5, same
starting latents; peak GPU memory of that 512x512 generation (``torch.cuda.max_memory_allocated``,
weights included); the load of a ~2 GB fp16 ``.safetensors`` onto the GPU in fresh processes; the fp16
64x64 UNet call at larger batches (``--batches``), where the GPU has enough work to show each
library's share of the matmul peak, with the graph replay under autocast and with NCHW UNet weights
(sdlite's settings before), and the VAE with channels-last weights. Then a table of levers on
sdlite's fp16 64x64 UNet call (graphs, autocast, the Upsample formulation, channels-last, PyTorch's
group_norm, ``torch.compile``), and sdlite's bundled model on the GPU; with ``--group-norm``, first
sdlite's fused GroupNorm kernels against PyTorch's, per call.

Usage (on a machine with CUDA; ``--device cpu --size tiny`` is a smoke run of the code paths)::

    python benchmarks/bench_cuda.py --out benchmarks/RESULTS-cuda.md
    python benchmarks/bench_cuda.py --device cpu --size tiny --out /tmp/x.md   # smoke run

The report is rewritten after every section, so a run stopped early keeps what it measured.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py; it puts the repository root and tests/ on sys.path)
from bench import PROMPT, SIZES, Row, rel_diff, table  # noqa: E402

import sdlite.ops as ops  # noqa: E402
from sdlite.cuda_graphs import GraphedCall  # noqa: E402
from sdlite import devices  # noqa: E402
from sdlite.devices import Precision  # noqa: E402

PRECISIONS = ("fp16", "bf16", "autocast")
WEIGHT = {"fp16": torch.float16, "bf16": torch.bfloat16, "autocast": torch.float32}
PEAK_OF = {"fp16": "fp16", "bf16": "bf16", "autocast": "fp16"}
TITLES = {
    "fp16": "fp16 weights (sdlite's CUDA default) on both sides",
    "bf16": "bf16 weights on both sides",
    "autocast": "fp32 weights, both under torch.autocast(float16)",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
             repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The sides alternately (ABBA), each call synchronized, in milliseconds: ``bench.alternate``
    without its ``gc.collect()`` before every call, which costs more than a GPU call (the garbage
    collector is off during the loop instead, so it cannot run inside a timed call)."""
    sides = list(fns)
    last: dict[str, Any] = {}
    times: dict[str, list[float]] = {s: [] for s in sides}
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                t0 = time.perf_counter()
                last[side] = fns[side]()
                sync(device)
                if r >= warmup:
                    times[side].append(1e3 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return times, last


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of ``torch.mm`` on two n x n matrices (best of 10 after 3 warm-ups)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def weight_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The weights' dtype; fp32 on the CPU, where the half-precision convolutions of a smoke run would
    take many minutes (a CPU run only proves the code paths)."""
    return WEIGHT[precision] if device.type == "cuda" else torch.float32


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "autocast" and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def sdlite_precision(device: torch.device, precision: str) -> Precision:
    """What sdlite's one policy (``sdlite.devices.choose``) gives for ``fp16``/``bf16``/``autocast``
    on CUDA; fp32 on the CPU."""
    if device.type != "cuda":
        return devices.choose(device, "fp32")
    return devices.choose(device, precision)


def param_bytes(modules: dict[str, torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in modules.values()
               for t in list(m.parameters()) + list(m.buffers()))


def build_sides(cfg: Any, weights: dict, device: torch.device, precision: str) -> tuple[dict, dict]:
    """sdlite's and diffusers' networks on ``device`` in ``precision``'s weight dtype, same tensors."""
    nets = bench.sdlite_networks(cfg, weights, torch.float32)
    dnets = bench.diffusers_networks(cfg, nets)
    dtype = weight_dtype(device, precision)
    dnets = {k: m.to(device=device, dtype=dtype) for k, m in dnets.items()}
    nets = {k: m.to(device=device, dtype=dtype) for k, m in nets.items()}
    nets["unet"].to(memory_format=devices.unet_memory_format(device))  # as sdlite.load does
    return nets, dnets


def vae_autocast(cfg: Any, nets: dict, prec: Precision) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast sdlite's pipeline decodes under (``Pipeline._vae_autocast``: none for half weights)."""
    from sdlite.clip import tokenizer_for
    from sdlite.pipeline import Pipeline

    return Pipeline(tokenizer_for(cfg.text), nets["text_encoder"], nets["unet"], nets["vae"], cfg, prec)._vae_autocast


def sdlite_unet(unet: torch.nn.Module, prec: Precision, device: torch.device) -> Callable[..., torch.Tensor]:
    """The UNet call as sdlite's pipeline makes it: replayed CUDA graphs on CUDA, else eager (under
    ``prec``'s autocast, if any)."""
    if device.type == "cuda":
        return GraphedCall(unet, prec)
    return lambda *args: _call(prec, lambda: unet(*args))


def network_rows(cfg: Any, nets: dict, dnets: dict, device: torch.device, precision: str,
                 flops: dict[str, float], args: argparse.Namespace) -> list[Row]:
    prec = sdlite_precision(device, precision)
    wdtype = weight_dtype(device, precision)
    gen = torch.Generator().manual_seed(0)
    w, r = args.warmup, args.repeats
    rows: list[Row] = []

    def add(row: Row, key: str, last: dict) -> None:
        if last:
            row.notes.append(f"max |Δ| / max |ref| = {rel_diff(last['sdlite'].float().cpu(), last['diffusers'].float().cpu()):.1e}")
        row.flops, row.peak_dtype = flops.get(key, 0.0), PEAK_OF[precision]
        rows.append(row)

    from sdlite.clip import tokenizer_for

    ids = tokenizer_for(cfg.text)([PROMPT, ""]).to(device)
    te, dte = nets["text_encoder"], dnets["text_encoder"]
    with torch.no_grad():
        times, last = timed_ms({
            "sdlite": lambda: _call(prec, lambda: te(ids)),
            "diffusers": lambda: _dcall(device, precision, lambda: dte(input_ids=ids).last_hidden_state),
        }, device, w, r)
    add(Row("text encoder, batch 2 x 77", "ms", times), "text", last)

    for key, hw in (("unet64", 64), ("unet32", 32)):
        x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=gen).to(device, wdtype)
        ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, wdtype)
        t = torch.tensor([500.0, 500.0], device=device)
        unet, dunet = nets["unet"], dnets["unet"]
        # sdlite as its pipeline runs the UNet: replayed CUDA graphs on CUDA (the eager call is a lever below)
        ours = sdlite_unet(unet, prec, device)
        with torch.no_grad():
            times, last = timed_ms({
                "sdlite": lambda: ours(x, t, ctx),
                "diffusers": lambda: _dcall(device, precision, lambda: dunet(x, t, encoder_hidden_states=ctx).sample),
            }, device, w, r)
        how = " (sdlite: CUDA graph replay)" if device.type == "cuda" else ""
        add(Row(f"UNet step, batch 2, {hw}x{hw} latent{how}", "ms", times), key, last)

    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(device, wdtype)
    vae, dvae, vae_ctx = nets["vae"], dnets["vae"], vae_autocast(cfg, nets, prec)

    def decode() -> torch.Tensor:
        with vae_ctx():
            return vae.decode(z)

    with torch.no_grad():
        times, last = timed_ms({
            "sdlite": decode,
            "diffusers": lambda: _dcall(device, precision, lambda: dvae.decode(z).sample),
        }, device, w, max(3, r // 2))
    add(Row("VAE decode, 64x64 latent -> 512x512", "ms", times), "vae64", last)
    return rows


def _call(prec: Precision, fn: Callable[[], Any]) -> Any:
    with prec.autocast():
        return fn()


def _dcall(device: torch.device, precision: str, fn: Callable[[], Any]) -> Any:
    with autocast_ctx(device, precision):
        return fn()


def sdlite_pipe(cfg: Any, nets: dict, device: torch.device, precision: str) -> Any:
    """sdlite's pipeline over ``nets``, set up as ``sdlite.load`` sets it up on ``device``."""
    from sdlite.clip import tokenizer_for
    from sdlite.pipeline import Pipeline

    pipe = Pipeline(tokenizer_for(cfg.text), nets["text_encoder"], nets["unet"], nets["vae"], cfg,
                    sdlite_precision(device, precision), name="bench")
    if device.type == "cuda":
        pipe.set_cuda_graphs()
    return pipe


def txt2img_rows(cfg: Any, nets: dict, dnets: dict, tokenizer: Any, device: torch.device, precision: str,
                 flops: dict[str, float], args: argparse.Namespace) -> list[Row]:
    pipe = sdlite_pipe(cfg, nets, device, precision)
    dpipe = bench.diffusers_pipeline(cfg, dnets, tokenizer)
    gen = torch.Generator().manual_seed(1)
    rows: list[Row] = []
    for size, steps, key in ((256, 10, "txt2img"), (512, 20, "txt2img512")):
        latents = torch.randn(1, cfg.vae.embed_dim, size // 8, size // 8, generator=gen)

        def ours() -> Any:
            return pipe.txt2img(PROMPT, negative_prompt="", steps=steps, guidance_scale=7.5, width=size,
                                height=size, sampler="euler", latents=latents, output_type="np")

        def theirs() -> Any:
            with autocast_ctx(device, precision):
                return dpipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, width=size,
                             height=size, latents=latents.to(device, weight_dtype(device, precision)), output_type="np").images

        times, last = timed_ms({"sdlite": ours, "diffusers": theirs}, device, 1, args.pipe_repeats)
        row = Row(f"txt2img {size}x{size}, {steps} Euler steps, CFG 7.5", "ms", times)
        diff = (torch.as_tensor(last["sdlite"]).float() - torch.as_tensor(last["diffusers"]).float()).abs()
        row.notes.append(f"images in [0, 1]: mean |Δ| = {diff.mean():.1e}, max |Δ| = {diff.max():.1e}")
        row.flops, row.peak_dtype = flops.get(key, 0.0), PEAK_OF[precision]
        rows.append(row)

        if size == 512 and device.type == "cuda":
            # Peak GPU memory of that generation, per side: the other side's weights sit on the GPU
            # too, so count this side's weights plus what the call added above the baseline.
            mem = Row(f"  peak GPU memory of that {size}x{size} txt2img (own weights + activations)", "MiB")
            for side, fn, mods in (("sdlite", ours, nets), ("diffusers", theirs, dnets)):
                if side == "sdlite" and pipe.cuda_graphs:
                    pipe._unet_graphs.reset()  # so the graph's memory pool is counted: captured in this call
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
                fn()
                sync(device)
                extra = torch.cuda.max_memory_allocated(device) - base
                # A CUDA graph's private pool stays reserved after the call without counting as allocated.
                reserved = torch.cuda.max_memory_reserved(device) - base_reserved
                mem.values[side] = [(param_bytes(mods) + extra) / 2**20]
                mem.notes.append(f"{side}: weights {param_bytes(mods) / 2**20:,.0f} + peak activations "
                                 f"{extra / 2**20:,.0f} MiB (reserved by the call: {reserved / 2**20:,.0f} MiB)")
            rows.append(mem)
    return rows


def lever_line(name: str, default: Callable[[], Any], changed: Callable[[], Any], device: torch.device,
               warmup: int, repeats: int, note: str = "") -> str:
    """One levers-table row: ``default`` and ``changed`` timed alternately, the ratio, and how far
    ``changed``'s output is from ``default``'s."""
    with torch.no_grad():
        times, last = timed_ms({"default": default, "changed": changed}, device, warmup, repeats)
    d, c = statistics.median(times["default"]), statistics.median(times["changed"])
    diff = rel_diff(last["changed"].float().cpu(), last["default"].float().cpu())
    note = "; ".join(filter(None, [note, f"max |Δ| / max |ref| = {diff:.1e}"]))
    row = f"| {name} | {d:.2f} | {c:.2f} | {c / d:.2f} | {note} |"
    print("  " + row, flush=True)
    return row


def lever_rows(cfg: Any, nets: dict, dnets: dict, device: torch.device, args: argparse.Namespace) -> list[str]:
    """sdlite's fp16 64x64 UNet call with one setting changed, timed alternately against the default."""
    prec = sdlite_precision(device, "fp16")
    gen = torch.Generator().manual_seed(2)
    dtype = weight_dtype(device, "fp16")
    x = torch.randn(2, cfg.unet.in_channels, 64, 64, generator=gen).to(device, dtype)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    unet, dunet = nets["unet"], dnets["unet"]
    out = ["| lever (sdlite fp16 UNet, batch 2, 64x64) | default ms | changed ms | changed / default | notes |",
           "|---|---:|---:|---:|---|"]

    def default() -> Any:
        with prec.autocast():
            return unet(x, t, ctx)

    def line(name: str, changed: Callable[[], Any], note: str = "", default: Callable[[], Any] = default) -> None:
        out.append(lever_line(name, default, changed, device, args.warmup, args.repeats, note))

    if device.type == "cuda":
        graphed = GraphedCall(unet, prec)
        line("CUDA graph replay (sdlite's pipeline default on CUDA)", lambda: graphed(x, t, ctx))

    def under_autocast() -> Any:
        with torch.autocast(device.type, dtype=torch.float16):
            return unet(x, t, ctx)

    line("under fp16 autocast (sdlite's CUDA policy before)", under_autocast)

    def phases() -> Any:
        with patch.object(ops, "UPSAMPLE_BY_PHASES", ("cpu", "cuda")):
            return default()

    line("Upsample as four 2x2 convs on the small map (sdlite's CPU formulation)", phases)

    def diffusers_plain() -> Any:
        return dunet(x, t, encoder_hidden_states=ctx).sample

    line("diffusers UNet instead (fp16, no autocast) — the reference", diffusers_plain)

    if device.type == "cuda":
        nchw = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)

        def nchw_weights() -> Any:
            with prec.autocast():
                return nchw(x, t, ctx)

        line("NCHW UNet weights (sdlite's CUDA layout before; now channels-last)", nchw_weights)
        del nchw
    line("PyTorch's group_norm and a separate SiLU (sdlite before its fused kernels)",
         lambda: without_fused_group_norm(default))
    line("sdlite's fused GELU product in GEGLU (ops.FUSED_GELU; off by default until measured)",
         lambda: with_fused_gelu(default))
    line("token merging 0.5 (an approximation; eager, as the pipeline runs it: no CUDA graphs)",
         lambda: with_token_merging(unet, default))
    if device.type == "cuda":
        merged_graph = GraphedCall(unet, prec)
        line("token merging 0.5 captured in a CUDA graph (the pipeline does not do this: untried)",
             lambda: with_token_merging(unet, lambda: merged_graph(x, t, ctx)))
    if device.type == "cuda":

        # The sampling loop's host-to-device copies (per-step sigmas, timesteps, the noise of CPU
        # generators) staged in pinned memory and queued (devices.to_device), against plain
        # blocking copies, each of which waits for the GPU to finish all queued work.
        pipe = sdlite_pipe(cfg, nets, device, "fp16")
        lat = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen)

        def txt2img() -> Any:
            return torch.as_tensor(pipe.txt2img(PROMPT, steps=20, guidance_scale=7.5, width=512, height=512,
                                                sampler="euler_a", seed=1, latents=lat, output_type="np"))

        def blocking_copies() -> Any:
            with patch.object(devices, "ASYNC_HOST_COPIES", False):
                return txt2img()

        out.append(lever_line("txt2img 512x512, 20 Euler a steps: blocking host-to-device copies (before)",
                              txt2img, blocking_copies, device, 1, max(3, args.pipe_repeats)))
        # The same generation with PyTorch's group_norm + SiLU: a second pipeline over the same
        # networks, whose CUDA graph is captured without the fused kernels.
        plain_pipe = sdlite_pipe(cfg, nets, device, "fp16")

        def plain_txt2img() -> Any:
            return without_fused_group_norm(lambda: torch.as_tensor(plain_pipe.txt2img(
                PROMPT, steps=20, guidance_scale=7.5, width=512, height=512, sampler="euler_a", seed=1, latents=lat,
                output_type="np")))

        out.append(lever_line("txt2img 512x512, 20 Euler a steps: PyTorch's group_norm + SiLU (before the fused "
                              "kernels)", txt2img, plain_txt2img, device, 1, max(3, args.pipe_repeats)))
        pipe = plain_pipe = None

    vae = nets["vae"]
    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(device, dtype)
    out += ["", "| lever (sdlite fp16 VAE decode, 64x64 latent) | default ms | changed ms | changed / default | notes |",
            "|---|---:|---:|---:|---|"]

    vae_ctx = vae_autocast(cfg, nets, prec)

    def vae_default() -> Any:  # as the pipeline decodes: fp16 weights, no autocast
        with vae_ctx():
            return vae.decode(z)

    def vae_under_autocast() -> Any:
        with torch.autocast(device.type, dtype=torch.float16):
            return vae.decode(z)

    def vae_phases() -> Any:
        with patch.object(ops, "UPSAMPLE_BY_PHASES", ("cpu", "cuda")):
            return vae_default()

    line("under fp16 autocast (sdlite's policy before; the default now runs half weights without)",
         vae_under_autocast, default=vae_default)
    line("Upsample as four 2x2 convs on the small map", vae_phases, default=vae_default)
    line("diffusers VAE instead (fp16, no autocast) — the reference", lambda: dnets["vae"].decode(z).sample,
         default=vae_default)
    line("PyTorch's group_norm and a separate SiLU (before the fused kernels)",
         lambda: without_fused_group_norm(vae_default), default=vae_default)

    return out


def batch_rows(cfg: Any, nets: dict, dnets: dict, device: torch.device, flops: dict[str, float],
               args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """The fp16 64x64 UNet call at larger batches (sdlite's pipeline call against diffusers' eager
    one): how much of the matmul peak each library reaches once the GPU has enough work. Then the
    CUDA graph replay against fp16 autocast and NCHW UNet weights (sdlite's CUDA settings before),
    the settings a graph still pays for; and the VAE with channels-last weights."""
    prec = sdlite_precision(device, "fp16")
    under_autocast = devices.Precision(prec.device, prec.weight_dtype, torch.float16)
    dtype = weight_dtype(device, "fp16")
    unet, dunet = nets["unet"], dnets["unet"]
    gen = torch.Generator().manual_seed(3)
    rows: list[Row] = []
    out = ["| lever (sdlite fp16 UNet, 64x64 latents) | default ms | changed ms | changed / default | notes |",
           "|---|---:|---:|---:|---|"]
    if device.type == "cuda":  # the layout before (sdlite's UNet is channels-last on CUDA now)
        nchw = GraphedCall(copy.deepcopy(unet).to(memory_format=torch.contiguous_format), prec)
    for batch in args.batches:
        x = torch.randn(batch, cfg.unet.in_channels, 64, 64, generator=gen).to(device, dtype)
        ctx = torch.randn(batch, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, dtype)
        t = torch.full((batch,), 500.0, device=device)
        ours = sdlite_unet(unet, prec, device)
        with torch.no_grad():
            times, last = timed_ms({
                "sdlite": lambda: ours(x, t, ctx),
                "diffusers": lambda: _dcall(device, "fp16", lambda: dunet(x, t, encoder_hidden_states=ctx).sample),
            }, device, args.warmup, args.repeats)
        how = " (sdlite: CUDA graph replay)" if device.type == "cuda" else ""
        row = Row(f"UNet step, batch {batch}, 64x64 latent{how}", "ms", times)
        row.notes.append(f"max |Δ| / max |ref| = {rel_diff(last['sdlite'].float().cpu(), last['diffusers'].float().cpu()):.1e}")
        row.flops, row.peak_dtype = flops.get("unet64", 0.0) * batch / 2, "fp16"
        rows.append(row)
        if device.type == "cuda":
            bare = GraphedCall(unet, under_autocast)
            out.append(lever_line(f"CUDA graph replay under fp16 autocast (the policy before), batch {batch}",
                                  lambda: ours(x, t, ctx), lambda: bare(x, t, ctx), device, args.warmup, args.repeats))
            bare.reset()
            # NCHW weights, sdlite's layout before devices.unet_memory_format: with channels-last
            # weights cuDNN skips its NCHW<->NHWC transposes around each conv (9% of a batch-16
            # call in the profile).
            out.append(lever_line(f"CUDA graph replay with NCHW UNet weights (the layout before), batch {batch}",
                                  lambda: ours(x, t, ctx), lambda: nchw(x, t, ctx), device, args.warmup, args.repeats))
            nchw.reset()
            plain = GraphedCall(unet, prec)  # captured without the fused GroupNorm kernels
            out.append(lever_line(f"CUDA graph replay with PyTorch's group_norm + SiLU (before the fused kernels), "
                                  f"batch {batch}", lambda: ours(x, t, ctx),
                                  lambda: without_fused_group_norm(lambda: plain(x, t, ctx)), device, args.warmup,
                                  args.repeats))
            plain.reset()
            gelu = GraphedCall(unet, prec)  # captured with the fused GELU product (FUSED_GELU)
            out.append(lever_line(f"CUDA graph replay with sdlite's fused GELU product in GEGLU (off by default), "
                                  f"batch {batch}", lambda: ours(x, t, ctx),
                                  lambda: with_fused_gelu(lambda: gelu(x, t, ctx)), device, args.warmup, args.repeats))
            gelu.reset()
        ours = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        nchw = None
        vae, vae_cl = nets["vae"], copy.deepcopy(nets["vae"]).to(memory_format=torch.channels_last)
        z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(device, dtype)
        out.append(lever_line("VAE decode 64x64 -> 512x512 with channels-last weights", lambda: vae.decode(z),
                              lambda: vae_cl.decode(z), device, args.warmup, max(3, args.repeats // 2)))
        del vae_cl
    return rows, (out if len(out) > 2 else [])


def compile_lever(cfg: Any, weights: dict, device: torch.device, flops: dict[str, float], peak: dict[str, float],
                  args: argparse.Namespace) -> list[str]:
    """``torch.compile`` of sdlite's fp16 UNet (default mode) against sdlite's default (CUDA graph
    replay on CUDA), 64x64 latents, at each of ``--compile-batches``, with the compile time and the
    share of the fp16 matmul peak each reaches. Run last: it compiles for about a minute per batch
    size. At batch 2 the call is launch-bound and graphs remove that; at large batches the GPU is
    busy and what is left is the memory-bound kernels between the matmuls, which compile fuses."""
    prec = sdlite_precision(device, "fp16")
    dtype = weight_dtype(device, "fp16")
    nets = bench.sdlite_networks(cfg, weights, torch.float32)  # the text encoder and VAE: --compile-txt2img
    unet = nets["unet"].to(device=device, dtype=dtype, memory_format=devices.unet_memory_format(device))
    default = sdlite_unet(unet, prec, device)
    compiled = torch.compile(unet, dynamic=False, mode=args.compile_mode)  # one static graph per batch size
    gen = torch.Generator().manual_seed(2)
    out = ["| lever (sdlite fp16 UNet, 64x64) | default ms | changed ms | changed / default | notes |",
           "|---|---:|---:|---:|---|"]
    for batch in args.compile_batches:
        x = torch.randn(batch, cfg.unet.in_channels, 64, 64, generator=gen).to(device, dtype)
        ctx = torch.randn(batch, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, dtype)
        t = torch.full((batch,), 500.0, device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            _call(prec, lambda: compiled(x, t, ctx))
        sync(device)
        first = time.perf_counter() - t0
        with torch.no_grad():
            times, last = timed_ms({"default": lambda: default(x, t, ctx),
                                    "changed": lambda: _call(prec, lambda: compiled(x, t, ctx))},
                                   device, args.warmup, args.repeats)
        d, c = statistics.median(times["default"]), statistics.median(times["changed"])
        diff = rel_diff(last["changed"].float().cpu(), last["default"].float().cpu())
        share = ""
        if flops.get("unet64") and peak.get("fp16"):
            f = flops["unet64"] * batch / 2
            share = (f"; {f / d / 1e9:.1f} / {f / c / 1e9:.1f} TFLOP/s = "
                     f"{f / d / 1e9 / peak['fp16']:.0%} / {f / c / 1e9 / peak['fp16']:.0%} of peak")
        out.append(f"| torch.compile(unet), mode {args.compile_mode or 'default'}, against the default (CUDA graph replay), batch {batch} | "
                   f"{d:.2f} | {c:.2f} | {c / d:.2f} | first call (compile) {first:.1f} s{share}; "
                   f"max |Δ| / max |ref| = {diff:.1e} |")
    if args.compile_txt2img:
        out.append(compile_txt2img_line(cfg, {**nets, "unet": unet}, device, args))
    return out


def compile_txt2img_line(cfg: Any, nets: dict, device: torch.device, args: argparse.Namespace) -> str:
    """A whole fp16 txt2img 512x512 (20 Euler steps, CFG) through ``pipe.compile(mode=...)`` against
    the default pipeline (CUDA graph replay), after one warm-up generation each (the compiled one
    compiles in it): the sampling loop around the compiled UNet, its copy of each output included.
    ``nets``: the UNet on ``device`` as :func:`compile_lever` laid it out, the other networks anywhere."""
    import copy

    unet = nets["unet"]
    nets = {k: m.to(device=device, dtype=weight_dtype(device, "fp16")) for k, m in nets.items() if k != "unet"}
    default = sdlite_pipe(cfg, {**nets, "unet": unet}, device, "fp16")
    compiled = sdlite_pipe(cfg, {**nets, "unet": copy.deepcopy(unet)}, device, "fp16")
    compiled.compile(mode=args.compile_mode)
    latents = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=torch.Generator().manual_seed(3))

    def generate(pipe: Any) -> Callable[[], Any]:
        return lambda: torch.as_tensor(pipe.txt2img(PROMPT, negative_prompt="", steps=20, guidance_scale=7.5,
                                                    width=512, height=512, sampler="euler", latents=latents,
                                                    output_type="np"))

    t0 = time.perf_counter()
    generate(compiled)()
    first = time.perf_counter() - t0
    times, last = timed_ms({"default": generate(default), "changed": generate(compiled)}, device, 1,
                           max(3, args.pipe_repeats))
    d, c = statistics.median(times["default"]), statistics.median(times["changed"])
    diff = (last["changed"].float() - last["default"].float()).abs().max().item()
    return (f"| txt2img 512x512, 20 Euler steps, CFG 7.5: pipe.compile(mode={args.compile_mode!r}) against the "
            f"default (CUDA graph replay) | {d:.1f} | {c:.1f} | {c / d:.2f} | first generation (compiles) "
            f"{first:.1f} s; images in [0, 1]: max |Δ| = {diff:.1e} |")


def low_memory_lines(cfg: Any, nets: dict, dnets: dict, tokenizer: Any, device: torch.device,
                     args: argparse.Namespace) -> list[str]:
    """Peak GPU memory and time of an fp16 txt2img (10 Euler steps, CFG) at each of
    ``--low-memory-sizes``: sdlite at its default and with ``low_memory`` (attention 1024 queries at a
    time, VAE tiles of half the native size, no CUDA graphs), diffusers at its default and with its
    own two levers (``enable_attention_slicing()``, ``vae.enable_tiling()``). Each side's figure is
    its own weights plus the call's peak allocation above the memory allocated before its warm-up
    call (both sides' weights sit on the GPU; sdlite's CUDA graph, captured in the warm-up, counts).
    One timed call each, after the warm-up call at that size."""
    pipe = sdlite_pipe(cfg, nets, device, "fp16")
    dpipe = bench.diffusers_pipeline(cfg, dnets, tokenizer)
    gen = torch.Generator().manual_seed(4)
    out = ["| size | sdlite default | sdlite low_memory | diffusers default "
           "| diffusers attention slicing + VAE tiling | notes |", "|---|---:|---:|---:|---:|---|"]

    def measure(fn: Callable[[], Any], mods: dict) -> tuple[float, float, Any]:
        if pipe.cuda_graphs:
            pipe._unet_graphs.reset()  # only this size's graph, captured below
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        fn()  # warm-up: kernels chosen, a CUDA graph captured (its memory stays allocated: counted)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0)
        return (param_bytes(mods) + torch.cuda.max_memory_allocated(device) - base) / 2**20, ms, result

    def sdlite_low_memory(on: bool) -> None:
        pipe.set_low_memory(on)
        if not on:
            pipe.set_cuda_graphs(device.type == "cuda")  # the default again (low_memory turned them off)

    def diffusers_low_memory(on: bool) -> None:
        if on:
            dpipe.enable_attention_slicing()
            dpipe.vae.enable_tiling()
        else:
            dpipe.disable_attention_slicing()
            dpipe.vae.disable_tiling()

    half = weight_dtype(device, "fp16")
    for size in args.low_memory_sizes:
        latents = torch.randn(1, cfg.vae.embed_dim, size // 8, size // 8, generator=gen)

        def ours() -> Any:
            return torch.as_tensor(pipe.txt2img(PROMPT, negative_prompt="", steps=10, guidance_scale=7.5, width=size,
                                                height=size, sampler="euler", latents=latents, output_type="np"))

        def theirs() -> Any:
            return torch.as_tensor(dpipe(PROMPT, negative_prompt="", num_inference_steps=10, guidance_scale=7.5,
                                         width=size, height=size, latents=latents.to(device, half),
                                         output_type="np").images)

        cells, images = [], []
        for fn, mods, low_memory in ((ours, nets, sdlite_low_memory), (theirs, dnets, diffusers_low_memory)):
            mib, ms, img = measure(fn, mods)
            cells.append(f"{mib:,.0f} MiB, {ms:,.0f} ms")
            low_memory(True)
            try:
                mib_low, ms_low, img_low = measure(fn, mods)
            finally:
                low_memory(False)
            cells.append(f"{mib_low:,.0f} MiB, {ms_low:,.0f} ms")
            images.append((img.float() - img_low.float()).abs().max().item())
        out.append(f"| {size}x{size} | {' | '.join(cells)} | images in [0, 1], default vs low-memory: max |Δ| = "
                   f"{images[0]:.1e} (sdlite), {images[1]:.1e} (diffusers) |")
    return out


def without_fused_group_norm(fn: Callable[[], Any]) -> Any:
    """``fn()`` with PyTorch's group_norm and a separate SiLU (sdlite before its fused kernels). A
    CUDA graph keeps the kernels it was captured with, so a graph for this side is captured in here."""
    with patch.object(ops, "FUSED_GROUP_NORM", ()):
        return fn()


def with_fused_gelu(fn: Callable[[], Any]) -> Any:
    """``fn()`` with GEGLU's ``a * gelu(gate)`` as sdlite's fused kernel (``ops.FUSED_GELU``, off by
    default: written in session 17 without a GPU to measure it on). A CUDA graph for this side is
    captured in here."""
    with patch.object(ops, "FUSED_GELU", ("cuda",)):
        return fn()


def with_token_merging(unet: torch.nn.Module, fn: Callable[[], Any], ratio: float = 0.5) -> Any:
    """``fn()`` with the UNet's token merging at ``ratio`` (sdlite.unet.tome), restored after. Its output
    moves away from the default's: merging is an approximation (the notes give how far)."""
    with unet.token_merging(ratio):
        return fn()


def group_norm_calls(module: torch.nn.Module, call: Callable[[], Any]) -> dict[tuple, list]:
    """Every GroupNorm call of ``call()``: {(shape, channels-last, groups, eps, silu): [count, x, norm]}."""
    calls: dict[tuple, list] = {}

    def hook(norm: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0]
        key = (tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
               norm.num_groups, norm.eps, bool(kwargs.get("silu", args[1] if len(args) > 1 else False)))
        if key in calls:
            calls[key][0] += 1
        else:
            calls[key] = [1, x.detach().clone(memory_format=torch.preserve_format), norm]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules()
               if isinstance(m, ops.GroupNorm)]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return calls


def graph_time_us(fn: Callable[[], Any], device: torch.device, per_graph: int = 20, replays: int = 10) -> float:
    """GPU time of one ``fn()`` in microseconds: ``per_graph`` calls captured in one CUDA graph, the
    median replay divided by ``per_graph`` (no launch cost: what a replayed UNet pays)."""
    with torch.no_grad():
        for _ in range(2):
            fn()  # compiles (Triton), chooses kernels
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / per_graph)
    del graph
    return statistics.median(times)


def group_norm_workloads(cfg: Any, nets: dict, device: torch.device) -> dict[str, dict[tuple, list]]:
    """Every GroupNorm call (:func:`group_norm_calls`) of the fp16 UNet at 64x64 latents, batch 2 and 16
    (channels-last maps, as sdlite runs it on CUDA), and of a VAE decode of a 64x64 latent (NCHW)."""
    dtype = weight_dtype(device, "fp16")
    gen = torch.Generator().manual_seed(5)
    unet, vae = nets["unet"], nets["vae"]
    workloads = {}
    for batch in (2, 16):
        x = torch.randn(batch, cfg.unet.in_channels, 64, 64, generator=gen).to(device, dtype)
        ctx = torch.randn(batch, cfg.text.max_length, cfg.unet.context_dim, generator=gen).to(device, dtype)
        t = torch.full((batch,), 500.0, device=device)
        workloads[f"UNet, batch {batch}"] = group_norm_calls(unet, lambda: unet(x, t, ctx))
    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=gen).to(device, dtype)
    workloads["VAE decode"] = group_norm_calls(vae, lambda: vae.decode(z))
    return workloads


def group_norm_us(calls: dict[tuple, list], device: torch.device, kernels: Any = None) -> float:
    """GPU µs of ``calls`` (:func:`group_norm_calls`) summed, each timed by :func:`graph_time_us`:
    through ``kernels.group_norm`` (``sdlite.kernels``, or another version of that module), or with
    ``kernels=None`` through PyTorch's group_norm and F.silu."""
    us = 0.0
    for (_, _, groups, eps, silu), (count, x, norm) in calls.items():
        if kernels is None:
            fn = lambda: without_fused_group_norm(  # noqa: E731
                lambda: ops.group_norm(x, groups, norm.weight, norm.bias, eps, silu))
        else:
            fn = lambda: kernels.group_norm(x, groups, norm.weight, norm.bias, eps, silu)  # noqa: E731
        us += count * graph_time_us(fn, device)
    return us


def group_norm_lines(cfg: Any, nets: dict, device: torch.device, args: argparse.Namespace) -> list[str]:
    """sdlite's fused GroupNorm (+ SiLU) kernels against PyTorch's group_norm and F.silu, on every
    GroupNorm call of the fp16 UNet (64x64 latents, batch 2 and 16; channels-last maps) and of the VAE
    decode (64x64 latent; NCHW maps), GPU time under CUDA graphs, summed over each network's calls.
    First a sweep of the kernels' tile size and warps; the rest of the run uses the best."""
    from sdlite import kernels

    workloads = group_norm_workloads(cfg, nets, device)

    def total_us(calls: dict[tuple, list], fused: bool) -> float:
        return group_norm_us(calls, device, kernels if fused else None)

    names = list(workloads)
    out = ["Sweep of the kernels' tile (elements per block) and warps: GPU µs per network call, all its "
           "GroupNorms summed (each call 20x in a CUDA graph).", "",
           "| tile | warps | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    best, best_score, first = None, float("inf"), None
    saved = kernels.TILE_ELEMENTS, kernels.NUM_WARPS
    for tile, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):  # each one compiles every kernel anew
        kernels.TILE_ELEMENTS, kernels.NUM_WARPS = tile, warps
        us = [total_us(workloads[n], True) for n in names]
        out.append(f"| {tile} | {warps} | " + " | ".join(f"{u:,.0f}" for u in us) + " |")
        print("  " + out[-1], flush=True)
        first = first or us
        score = sum(u / f for u, f in zip(us, first))  # each network counts the same
        if score < best_score:
            best, best_score = (tile, warps), score
    kernels.TILE_ELEMENTS, kernels.NUM_WARPS = best
    out += ["", f"Best (smallest sum of the three, each relative to the first row): tile {best[0]}, {best[1]} warps; "
                "the rest of this run uses it "
                f"(sdlite's defaults: tile {saved[0]}, {saved[1]} warps).", "",
            "| GroupNorm calls of | PyTorch group_norm + SiLU, µs | fused kernels, µs | fused / PyTorch | calls |",
            "|---|---:|---:|---:|---|"]
    for n in names:
        calls = workloads[n]
        plain, fused = total_us(calls, False), total_us(calls, True)
        out.append(f"| {n} | {plain:,.0f} | {fused:,.0f} | {fused / plain:.2f} | {sum(c[0] for c in calls.values())} "
                   f"calls, {len(calls)} distinct |")
        print("  " + out[-1], flush=True)
    out += ["", "Per distinct call (UNet, batch 2): shape, layout, SiLU, count, PyTorch µs, fused µs.", "",
            "| shape | layout | SiLU | count | PyTorch µs | fused µs | ratio |", "|---|---|---|---:|---:|---:|---:|"]
    for (shape, cl, groups, eps, silu), (count, x, norm) in workloads["UNet, batch 2"].items():
        one = {(shape, cl, groups, eps, silu): [1, x, norm]}
        p, f = total_us(one, False), total_us(one, True)
        out.append(f"| {'x'.join(map(str, shape))} | {'channels-last' if cl else 'NCHW'} | {'yes' if silu else 'no'} "
                   f"| {count} | {p:.1f} | {f:.1f} | {f / p:.2f} |")

    # What an eager call costs the host: a small map, so that the GPU waits for the host; 500 calls
    # queued, then one synchronize, alternating the two sides.
    gen, dtype = torch.Generator().manual_seed(6), weight_dtype(device, "fp16")
    x = torch.randn(2, 1280, 8, 8, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(1280, generator=gen).to(device, dtype) for _ in range(2))
    sides = {"fused kernels": lambda: ops.group_norm(x, 32, w, b, 1e-5, silu=True),
             "PyTorch group_norm + SiLU": lambda: without_fused_group_norm(
                 lambda: ops.group_norm(x, 32, w, b, 1e-5, silu=True))}
    host: dict[str, list[float]] = {k: [] for k in sides}
    with torch.no_grad():
        for fn in sides.values():
            fn()
        for _ in range(5):
            for name, fn in sides.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(500):
                    fn()
                sync(device)
                host[name].append((time.perf_counter() - t0) / 500 * 1e6)
    fused_us, plain_us = (statistics.median(host[k]) for k in sides)
    out += ["", f"Eager calls on a 2x1280x8x8 map (host-bound; 500 calls, then one synchronize; median of 5): "
                f"fused kernels {fused_us:.1f} µs per call, PyTorch's group_norm + SiLU {plain_us:.1f} µs "
                f"({fused_us / plain_us:.2f}x)."]
    return out


def bundled_rows(device: torch.device, args: argparse.Namespace) -> list[Row]:
    """sdlite's bundled model on this device at its defaults (64x64, Euler a, 20 steps), one image and a
    batch of 8; and the largest difference from the same image drawn on the CPU in fp32."""
    import sdlite

    pipe = sdlite.load(device=device)
    cpu = sdlite.load(device="cpu")
    rows = []
    for n in (1, 8):
        times, last = timed_ms({"sdlite": lambda: pipe.txt2img("a red circle on the left", seed=1, batch_size=n,
                                                                output_type="np")}, device, 1, args.pipe_repeats)
        row = Row(f"bundled model, {n} image(s) 64x64, 20 Euler a steps ({pipe.precision.weight_dtype})", "ms", times)
        if n == 1:
            ref = cpu.txt2img("a red circle on the left", seed=1, output_type="np")
            row.notes.append(f"vs the CPU fp32 image: max |Δ| = {abs(last['sdlite'] - ref).max():.1e} (pixels in [0, 1])")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Checkpoint load onto the GPU, in fresh processes
# ---------------------------------------------------------------------------------------------

def child_main(spec: dict[str, Any]) -> None:
    device = torch.device(spec["device"])
    if spec["side"] == "sdlite":
        import sdlite
    else:
        from diffusers import StableDiffusionPipeline
    torch.zeros(1, device=device)  # CUDA context: paid by both sides, outside the timed load
    sync(device)
    t0 = time.perf_counter()
    if spec["side"] == "sdlite":
        pipe = sdlite.load(spec["ckpt"], device=device, dtype="fp16", config=spec.get("config") and
                           bench.ModelConfig.from_json(spec["config"]))
        how = "sdlite.load(device=..., dtype='fp16')"
    else:
        pipe = StableDiffusionPipeline.from_single_file(spec["ckpt"], config=spec["config_dir"], local_files_only=True,
                                                        torch_dtype=torch.float16).to(device)
        how = "StableDiffusionPipeline.from_single_file(torch_dtype=float16, local config).to(device)"
    sync(device)
    res = {"load_s": time.perf_counter() - t0, "peak_rss": bench._peak_mib(), "how": how,
           "gpu_mib": torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}
    del pipe
    bench.report_to_parent(res)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return bench.run_spec(str(Path(__file__).resolve()), spec, env, timeout=600)


def load_rows(cfg: Any, weights: dict, device: torch.device, size: str, workdir: Path, repeats: int) -> list[Row]:
    ckpt, config_dir = workdir / "original-fp16.safetensors", workdir / "diffusers-config"
    bench.write_checkpoint(cfg, weights, ckpt)
    nets = bench.sdlite_networks(cfg, weights, torch.float32)
    bench.write_config_dir(cfg, bench.diffusers_networks(cfg, nets), config_dir)
    del nets
    base = {"ckpt": str(ckpt), "config_dir": str(config_dir), "device": str(device),
            "config": None if size == "sd15" else cfg.to_json()}
    for side in bench.SIDES:  # warm the page cache; untimed
        run_child({**base, "side": side})
    results: dict[str, list[dict]] = {s: [] for s in bench.SIDES}
    for r in range(repeats):
        for side in (bench.SIDES if r % 2 == 0 else bench.SIDES[::-1]):
            results[side].append(run_child({**base, "side": side}))
    t_row = Row(f"load {ckpt.stat().st_size / 2**30:.2f} GiB fp16 .safetensors onto {device.type} (fresh process)", "s")
    m_row = Row("  host peak RSS of that load", "MiB")
    for side in bench.SIDES:
        ok = [x for x in results[side] if "error" not in x]
        t_row.values[side] = [x["load_s"] for x in ok]
        m_row.values[side] = [x["peak_rss"] for x in ok]
        if ok:
            t_row.notes.append(f"{side}: {ok[-1]['how']}, {ok[-1]['gpu_mib']:,.0f} MiB on the device")
        else:
            t_row.notes.append(f"{side} FAILED: {results[side][-1]['error']}")
    return [t_row, m_row]


# ---------------------------------------------------------------------------------------------
# Report and main
# ---------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or 'unknown'}, {os.cpu_count()} logical CPUs) — smoke run only"
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


def write_report(path: Path, ctx: dict[str, Any], sections: dict[str, list[Row]], extra: list[str]) -> None:
    out = bench.report_head("sdlite vs diffusers: CUDA benchmark", ctx["banner"])
    out += [
        f"- Date: {ctx['date']} ({(time.time() - ctx['started']) / 60:.1f} min into the run at this report)",
        f"- Command: `{ctx['command']}`",
        f"- Device: {ctx['device_name']}",
        bench.versions_line(ctx["commit"]),
        f"- Model: `--size {ctx['size']}`; seeded random weights in the original layout, the same tensors in both "
        "libraries (diffusers' own converters of the original layout).",
        f"- Method: each row alternates sdlite and diffusers (ABBA), {ctx['warmup']} warm-up round(s), then "
        f"{ctx['repeats']} timed repeats (txt2img: 1 warm-up, {ctx['pipe_repeats']} repeats; VAE: half). Each call ends "
        "with torch.cuda.synchronize() inside the timed region. *sdlite / diffusers* is the ratio of the medians "
        "(below 1: sdlite faster or smaller).",
        "",
        "## Matmul peak (measured in this run)",
        "",
        "| dtype | TFLOP/s (torch.mm, n = %d) |" % ctx["peak_n"],
        "|---|---:|",
    ]
    # bench.table's "% of peak" expects GFLOP/s
    peaks_g = {k: (v * 1e3, ctx["peak_n"]) for k, v in ctx["peaks"].items()}
    out += [f"| {k} | {v:.1f} |" for k, v in ctx["peaks"].items()] + [""]
    for key, rows in sections.items():
        if rows:
            out += [f"## {TITLES.get(key, key)}", "", table(rows, peaks_g), ""]
    out += extra
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run of the code paths")
    p.add_argument("--size", choices=sorted(SIZES), default="sd15")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"subset of {','.join(PRECISIONS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per network row (txt2img: --pipe-repeats)")
    p.add_argument("--pipe-repeats", type=int, default=5)
    p.add_argument("--load-repeats", type=int, default=2, help="fresh-process loads per side (0: no load row)")
    p.add_argument("--no-levers", dest="levers", action="store_false", help="leave out the fp16 levers table")
    p.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",") if b.strip()], default=[8, 16],
                   help="batch sizes for the fp16 UNet-by-batch rows ('' for none)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the torch.compile lever")
    p.add_argument("--compile-batches", type=lambda v: [int(b) for b in v.split(",") if b.strip()], default=[2],
                   help="batch sizes for the torch.compile lever (one compile each)")
    p.add_argument("--compile-mode", default=None, help="torch.compile's mode for that lever (default: its default)")
    p.add_argument("--compile-txt2img", action="store_true",
                   help="also time a whole 512x512 txt2img through pipe.compile(mode=--compile-mode) (one more compile)")
    p.add_argument("--low-memory-sizes", type=lambda v: [int(b) for b in v.split(",") if b.strip()], default=[],
                   help="image sides for the low-memory table (fp16 txt2img, each side's default and low-memory "
                        "options; e.g. 512,1024; default: none)")
    p.add_argument("--group-norm", action="store_true",
                   help="first, the fused GroupNorm kernels against PyTorch's per call, with a sweep of their tile size")
    p.add_argument("--budget-s", type=float, default=420, help="skip the optional sections once this many seconds passed")
    p.add_argument("--commit", default=None, help="the commit measured (when the tree has no .git)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "RESULTS-cuda.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    started = time.time()
    deadline = started + args.budget_s
    device = torch.device(args.device)
    cfg = SIZES[args.size]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        sys.exit(f"--precisions: choose from {','.join(PRECISIONS)} (or '' for none)")
    log = lambda msg: print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)  # noqa: E731
    banner = [args.note] if args.note else []
    if device.type != "cuda":
        banner.append("smoke run on the CPU: these numbers say nothing about a GPU")
    if args.size != "sd15":
        banner.append(f"--size {args.size}: not SD1.5 dimensions")
    ctx: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "started": started,
        "command": shlex.join(["python", "benchmarks/bench_cuda.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": args.commit or bench.git_commit(), "size": args.size, "device_name": device_name(device),
        "warmup": args.warmup, "repeats": args.repeats, "pipe_repeats": args.pipe_repeats, "banner": ". ".join(banner),
    }
    out = Path(args.out)
    sections: dict[str, list[Row]] = {}
    extra: list[str] = []

    def report() -> None:
        write_report(out, ctx, sections, extra)

    def guarded(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:
            tb = traceback.format_exc()
            print(tb, flush=True)
            extra.extend([f"## {name}: FAILED", "", "```", tb.strip()[-1500:], "```", ""])
            return None
        finally:
            report()

    n = 8192 if device.type == "cuda" else 512
    ctx["peak_n"] = n
    ctx["peaks"] = {name: matmul_peak(device, dt, n) for name, dt in
                    (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32))}
    log(f"matmul peak {ctx['peaks']}")
    flops = bench.network_flops(cfg)
    flops["txt2img512"] = 20 * flops["unet64"] + flops["vae64"] + flops["text"]
    log("random weights")
    weights = bench.random_original_weights(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="sdlite-bench-cuda-"))
    tokenizer = bench.write_clip_tokenizer(workdir / "tokenizer")

    def bundled_and_load() -> None:
        if time.time() < deadline:
            log("bundled model")
            sections["bundled model (sdlite only; its CUDA default, fp16)"] = guarded(
                "bundled", lambda: bundled_rows(device, args)) or []
        if args.load_repeats and time.time() < deadline - 60:
            log("load")
            sections["checkpoint load"] = guarded(
                "load", lambda: load_rows(cfg, weights, device, args.size, workdir, args.load_repeats)) or []
        elif args.load_repeats:
            extra.append("Load rows skipped: the time budget (--budget-s) ran out.")

    # The order puts the goals first: fp16 rows and levers, the bundled model and the load; then the
    # other precisions while the budget lasts; torch.compile (a minute of compiling) last.
    for i, precision in enumerate(precisions):
        if i > 0 and time.time() > deadline - 60:
            extra.append(f"{precision} rows skipped: the time budget (--budget-s) ran out.")
            continue
        log(f"{precision}: building both sides")
        built = guarded(f"{precision}: build", lambda: build_sides(cfg, weights, device, precision))
        if built is None:
            continue
        nets, dnets = built
        sections[precision] = []
        if precision == "fp16" and args.group_norm and device.type == "cuda":
            log("fp16: fused GroupNorm kernels")
            lines = guarded("group norm", lambda: group_norm_lines(cfg, nets, device, args))
            if lines:
                extra.extend(["## Fused GroupNorm + SiLU kernels (fp16)", "", *lines, ""])
        log(f"{precision}: networks")
        rows = guarded(f"{precision}: networks",
                       lambda: network_rows(cfg, nets, dnets, device, precision, flops, args))
        sections[precision] += rows or []
        log(f"{precision}: txt2img")
        rows = guarded(f"{precision}: txt2img",
                       lambda: txt2img_rows(cfg, nets, dnets, tokenizer, device, precision, flops, args))
        sections[precision] += rows or []
        if precision == "fp16" and args.batches and time.time() < deadline - 60:
            log("fp16: UNet by batch size")
            got = guarded("batches", lambda: batch_rows(cfg, nets, dnets, device, flops, args))
            if got:
                sections["fp16: the UNet call at larger batches"] = got[0]
                if got[1]:
                    extra.extend(["## Autocast and memory format under a CUDA graph", "", *got[1], ""])
        if precision == "fp16" and args.levers:
            log("levers")
            lines = guarded("levers", lambda: lever_rows(cfg, nets, dnets, device, args))
            if lines:
                extra.extend(["## Levers", "", *lines, ""])
        nets = dnets = built = None  # free this precision's networks before the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if i == 0:
            bundled_and_load()
    if not precisions:
        bundled_and_load()
    if args.low_memory_sizes and device.type == "cuda":
        log("low-memory options")
        built = guarded("low memory: build", lambda: build_sides(cfg, weights, device, "fp16"))
        if built is not None:
            lines = guarded("low memory", lambda: low_memory_lines(cfg, *built, tokenizer, device, args))
            if lines:
                extra.extend(["## Low-memory options (fp16, peak GPU memory and time of one txt2img, 10 steps)",
                              "", *lines, ""])
        built = None
        gc.collect()
        torch.cuda.empty_cache()
    if args.compile and time.time() < deadline - 90:
        log("torch.compile lever")
        lines = guarded("torch.compile", lambda: compile_lever(cfg, weights, device, flops, ctx["peaks"], args))
        if lines:
            extra.extend(["## torch.compile", "", *lines, ""])
    elif args.compile:
        extra.append("torch.compile lever skipped: the time budget (--budget-s) ran out.")
    report()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
