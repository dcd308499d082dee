"""bf16 weights on a CPU without native bf16 kernels: sdlite, diffusers, and both libraries in fp32.

On x86 CPUs without AVX512-BF16 or AMX (this project's AVX2 machine, most desktop CPUs before
2022), PyTorch runs bf16 matmuls and convolutions in reference loops, 26-55x slower than fp32.
sdlite's convolutions and linear layers compute half inputs in fp32 there and round the result
back (``sdlite/ops.py``), the arithmetic of a native bf16 kernel; diffusers runs PyTorch's loops.
This script measures, in one process, alternating the sides of each row:

1. bf16 weights in both libraries: text encoder (batch 2 x 77) and one UNet step (batch 2, 32x32
   latent). diffusers' bf16 UNet call takes minutes here, so it runs ``--slow-repeats`` times (1).
2. What bf16 weights cost against fp32 compute: one UNet step at 32x32 and 64x64, a VAE decode at
   64x64 latents and a whole txt2img (256x256, 10 Euler steps, CFG 7.5), sdlite bf16 against sdlite
   fp32 and diffusers fp32.
   diffusers' bf16 txt2img is not run: it would take ten of its bf16 UNet steps (the report prints
   that product, marked as an extrapolation).

Not a test; nothing asserts. Usage (from the repository root)::

    python benchmarks/bf16_cpu.py                     # SD1.5 size, ~18 min on 2 cores, ~12 GB RAM
    python benchmarks/bf16_cpu.py --size tiny --repeats 1 --out /tmp/bf16.md   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import bench  # benchmarks/bench.py: the networks, the alternating timer, machine facts

from sdlite.clip import build_text_encoder, tokenizer_for  # noqa: E402
from sdlite.devices import cpu_has_fast  # noqa: E402
from sdlite.ops import HALF_AS_FP32  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
STARTED = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - STARTED:7.1f}s] {msg}", flush=True)


def unet_call(unet: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor, diffusers: bool) -> Callable[[], torch.Tensor]:
    t = torch.tensor([500.0, 500.0])

    def call() -> torch.Tensor:
        with torch.no_grad():
            if diffusers:
                return unet(x, t, encoder_hidden_states=ctx).sample
            return unet(x, t, ctx)
    return call


def unet_inputs(cfg: Any, hw: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, hw, hw, generator=g)
    ctx = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=g)
    return x.to(dtype), ctx.to(dtype)


def rel_err(a: Any, ref: Any) -> float:
    a, ref = torch.as_tensor(a).double(), torch.as_tensor(ref).double()
    return float((a - ref).norm() / ref.norm())


class Table:
    """Rows of named sides: median and min seconds, and the ratios asked for."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, times: dict[str, list[float]], ratios: list[tuple[str, str]], notes: list[str]) -> None:
        med = {k: statistics.median(v) for k, v in times.items() if v}
        cells = "; ".join(f"{k} {med[k]:.2f} s (min {min(times[k]):.2f}, n={len(times[k])})" for k in med)
        rs = "; ".join(f"{a} / {b} = **{med[a] / med[b]:.3f}**" for a, b in ratios if a in med and b in med)
        self.lines.append(f"| {name} | {cells} | {rs} | {'; '.join(notes)} |")
        log(f"{name}: {cells} | {rs}")

    def markdown(self) -> str:
        return "\n".join(["| row | seconds per call (median) | ratios of medians | notes |", "|---|---|---|---|",
                          *self.lines])


def both_in_bf16(cfg: Any, weights: dict[str, dict[str, torch.Tensor]], nets: dict[str, torch.nn.Module],
                 table: Table, r: int, slow_repeats: int) -> float:
    """Part 1: the text encoder and a 32x32 UNet step, bf16 weights in both libraries. Returns the
    median seconds of diffusers' bf16 UNet call (its networks are freed on return)."""
    log("bf16: diffusers' networks")
    dnets = bench.diffusers_networks(cfg, nets)
    ids = tokenizer_for(cfg.text)([bench.PROMPT, ""])
    te, dte = nets["text_encoder"], dnets["text_encoder"]
    te32 = build_text_encoder(cfg.text)
    te32.load_state_dict(weights["text_encoder"], strict=True)
    with torch.no_grad():
        reference_text = te32.eval()(ids)

    def text_ours() -> torch.Tensor:
        with torch.no_grad():
            return te(ids)

    def text_theirs() -> torch.Tensor:
        with torch.no_grad():
            return dte(input_ids=ids).last_hidden_state

    times, last = bench.alternate({"sdlite bf16": text_ours, "diffusers bf16": text_theirs}, 1, r)
    table.add("text encoder, batch 2 x 77, bf16 weights", times, [("sdlite bf16", "diffusers bf16")],
              [f"‖Δ‖/‖fp32‖: sdlite {rel_err(last['sdlite bf16'], reference_text):.1e}, "
               f"diffusers {rel_err(last['diffusers bf16'], reference_text):.1e}"])

    x, ctx = unet_inputs(cfg, 32, BF16)
    ours, theirs = unet_call(nets["unet"], x, ctx, False), unet_call(dnets["unet"], x, ctx, True)
    ours()  # sdlite's warm-up (its Upsample kernels are cached on the first call); diffusers gets none
    times, last = bench.alternate({"sdlite bf16": ours, "diffusers bf16": theirs}, 0, slow_repeats)
    table.add("UNet step, batch 2, 32x32 latent, bf16 weights", times, [("sdlite bf16", "diffusers bf16")],
              [f"‖Δ‖/‖diffusers‖ = {rel_err(last['sdlite bf16'], last['diffusers bf16']):.1e}"])
    return statistics.median(times["diffusers bf16"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(bench.SIZES), default="sd15")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per row (after one warm-up round)")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed calls of diffusers' bf16 UNet (no warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "RESULTS-bf16-cpu.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench.SIZES[args.size]
    r = args.repeats
    started = _dt.datetime.now(_dt.timezone.utc)
    facts = bench.cpu_facts()
    table = Table()

    log("random weights")
    weights = bench.random_original_weights(cfg)
    params = {k: sum(v.numel() for v in sd.values()) for k, sd in weights.items()}

    # 1. bf16 weights in both libraries.
    nets = bench.sdlite_networks(cfg, weights, BF16)
    tokenizer = bench.write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="sdlite-bf16-")))
    slow_unet = both_in_bf16(cfg, weights, nets, table, r, args.slow_repeats)

    # 2. bf16 weights against fp32 compute (sdlite's bf16 networks are kept from part 1).
    log("fp32: building both libraries' networks")
    nets32 = bench.sdlite_networks(cfg, weights, FP32)
    dnets32 = bench.diffusers_networks(cfg, nets32)
    del weights
    for hw in (32, 64):
        xb, cb = unet_inputs(cfg, hw, BF16)
        x32, c32 = unet_inputs(cfg, hw, FP32)
        fns = {"sdlite bf16": unet_call(nets["unet"], xb, cb, False),
               "sdlite fp32": unet_call(nets32["unet"], x32, c32, False),
               "diffusers fp32": unet_call(dnets32["unet"], x32, c32, True)}
        times, last = bench.alternate(fns, 1, r)
        notes = [f"‖Δ‖/‖fp32‖ of sdlite bf16 = {rel_err(last['sdlite bf16'], last['sdlite fp32']):.1e}"]
        if hw == 32:
            notes.append(f"diffusers bf16 (part 1) / sdlite bf16 = {slow_unet / statistics.median(times['sdlite bf16']):.0f}")
        table.add(f"UNet step, batch 2, {hw}x{hw} latent", times,
                  [("sdlite bf16", "sdlite fp32"), ("sdlite bf16", "diffusers fp32")], notes)

    z = torch.randn(1, cfg.vae.embed_dim, 64, 64, generator=torch.Generator().manual_seed(2))

    def decode(vae: torch.nn.Module, dtype: torch.dtype, diffusers: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return vae.decode(z.to(dtype)).sample if diffusers else vae.decode(z.to(dtype))
        return call

    fns = {"sdlite bf16": decode(nets["vae"], BF16, False), "sdlite fp32": decode(nets32["vae"], FP32, False),
           "diffusers fp32": decode(dnets32["vae"], FP32, True)}
    times, last = bench.alternate(fns, 1, r)
    table.add("VAE decode, 64x64 latent -> 512x512", times,
              [("sdlite bf16", "sdlite fp32"), ("sdlite bf16", "diffusers fp32")],
              [f"‖Δ‖/‖fp32‖ of sdlite bf16 = {rel_err(last['sdlite bf16'], last['sdlite fp32']):.1e}; diffusers bf16 "
               "not run (about half an hour of PyTorch's reference bf16 convolutions)"])

    size = 256
    latents = torch.randn(1, cfg.vae.embed_dim, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    pipes = {"sdlite bf16": bench.sdlite_pipeline(cfg, nets, "bf16"), "sdlite fp32": bench.sdlite_pipeline(cfg, nets32, "fp32")}
    dpipe = bench.diffusers_pipeline(cfg, dnets32, tokenizer)

    def sd(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe.txt2img(bench.PROMPT, negative_prompt="", steps=10, guidance_scale=7.5, width=size,
                                    height=size, sampler="euler", latents=latents, output_type="np")

    fns = {k: sd(v) for k, v in pipes.items()}
    fns["diffusers fp32"] = lambda: dpipe(bench.PROMPT, negative_prompt="", num_inference_steps=10, guidance_scale=7.5,
                                          width=size, height=size, latents=latents, output_type="np").images
    times, last = bench.alternate(fns, 1, max(1, min(r, 2)))
    diff = (torch.as_tensor(last["sdlite bf16"]) - torch.as_tensor(last["sdlite fp32"])).abs()
    table.add("txt2img 256x256, 10 Euler steps, CFG 7.5", times,
              [("sdlite bf16", "sdlite fp32"), ("sdlite bf16", "diffusers fp32")],
              [f"images in [0, 1], sdlite bf16 against fp32: mean |Δ| {diff.mean():.1e}, max {diff.max():.1e}",
               f"diffusers bf16 not run: ≥ 10 of its bf16 UNet steps ≈ {10 * slow_unet / 60:.0f} min (extrapolated "
               f"from part 1), against {statistics.median(times['sdlite bf16']):.0f} s for sdlite bf16"])

    weight_mib = {name: n * 2 / 2**20 for name, n in params.items()}
    lines = [
        "# bf16 weights on a CPU without native bf16: sdlite and diffusers", "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; commit {args.commit or bench.git_commit()}; size `{args.size}`",
        f"- Machine: {facts.get('model', '?')}, {torch.get_num_threads()} threads; flags: {', '.join(facts.get('flags', []))}",
        f"- Native kernels (oneDNN probe): bf16 {cpu_has_fast(BF16)}, fp16 {cpu_has_fast(torch.float16)}; "
        f"sdlite computes in fp32: {sorted(str(d).removeprefix('torch.') for d in HALF_AS_FP32) or 'nothing'}",
        bench.versions_line(args.commit or bench.git_commit()),
        f"- bf16 weights: {', '.join(f'{k} {v:,.0f} MiB' for k, v in weight_mib.items())} (half of fp32)",
        "- Each row ran its sides alternately in one process (one warm-up round, except diffusers' bf16 UNet).",
        "", table.markdown(), "",
        f"Finished {_dt.datetime.now(_dt.timezone.utc):%H:%M} UTC.", "",
    ]
    Path(args.out).write_text("\n".join(lines))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
