"""Command lines of scripts/txt2img.py and scripts/img2img.py.

The flags of the original CompVis scripts (``--prompt --ckpt --outdir --ddim_steps --scale --seed --H --W
--n_samples --n_iter --precision --from-file --strength --init-img``) and the ones people expect today
(``--negative-prompt --steps --sampler --schedule --device``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import ArgumentError, SdliteError

_NUMBERED = re.compile(r"^(\d{5})")


def save_numbered(image, outdir: Path, text: str) -> Path:
    """Save as ``outdir/NNNNN.png`` with the next free number; never overwrites (exclusive create)."""
    from .infotext import save_png

    outdir.mkdir(parents=True, exist_ok=True)
    n = max((int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name))), default=-1) + 1
    while True:
        path = outdir / f"{n:05d}.png"
        try:
            with open(path, "xb") as f:
                save_png(image, f, text)
            return path
        except FileExistsError:
            n += 1


def _parser(img2img: bool) -> argparse.ArgumentParser:
    kind = "img2img" if img2img else "txt2img"
    p = argparse.ArgumentParser(prog=f"{kind}.py", description=(
        "Redraw an image under a text prompt." if img2img else "Generate images from a text prompt.")
        + " Without --ckpt, the bundled model is used.")
    p.add_argument("--prompt", type=str, default=None, help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="", help="what to avoid")
    p.add_argument("--from-file", dest="from_file", type=Path, default=None, help="one prompt per line")
    p.add_argument("--ckpt", type=Path, default=None, help="a .ckpt/.safetensors in the original layout")
    p.add_argument("--outdir", type=Path, default=Path(f"outputs/{kind}-samples"))
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=20, help="sampling steps")
    p.add_argument("--sampler", default="euler_a", help="euler_a, euler, heun, lms, dpmpp_2m, ddim, plms, ddpm, ... "
                                                         "or A1111 names ('Euler a', 'DPM++ 2M Karras')")
    p.add_argument("--plms", action="store_true", help="use the PLMS sampler (CompVis flag)")
    p.add_argument("--schedule", default=None, help="automatic, karras, exponential, ... (default: the sampler's)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (CFG)")
    p.add_argument("--ddim_eta", "--eta", dest="eta", type=float, default=None, help="eta of DDIM/ancestral samplers")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed+i); -1 = random")
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (default: the model's native size)")
    p.add_argument("--n_samples", type=int, default=1, help="batch size")
    p.add_argument("--n_iter", type=int, default=1, help="number of batches")
    p.add_argument("--precision", default=None, help="fp32 (= full), fp16, bf16, or autocast (fp32 weights under autocast; default: fp16 on CUDA, fp32 on the CPU; "
                   "bf16/fp16 on a CPU only pay off with AVX512-BF16/AMX: elsewhere they are 50-100x slower, and sdlite warns)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="override eps/v detection")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=1)
    p.add_argument("--low-memory", dest="low_memory", action="store_true",
                   help="chunked attention and tiled VAE decoding, for small GPUs (slightly slower)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (compiles for minutes on first use; measured slower than eager "
                        "on a 2-core CPU, see benchmarks/RESULTS-compile.md)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the UNet eagerly on CUDA instead of replaying CUDA graphs (the default there: "
                        "faster, holds one UNet call's activations; see benchmarks/RESULTS-cuda.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core; 1 can be faster "
                        "when another program keeps a core busy)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if img2img:
        p.add_argument("--init-img", "--init_img", dest="init_img", type=Path, required=True, help="the image to redraw")
        p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.from_file is not None:
        if not args.from_file.is_file():
            raise ArgumentError(f"--from-file {args.from_file} does not exist")
        prompts = [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ArgumentError(f"--from-file {args.from_file} has no prompts")
        return prompts
    if args.prompt is None:
        raise ArgumentError("give --prompt or --from-file")
    return [args.prompt]


def run(argv: Sequence[str] | None, img2img: bool) -> int:
    args = _parser(img2img).parse_args(argv)
    try:
        import sdlite
        from .schedulers import parse_sampler_and_schedule

        prompts = _prompts(args)
        sampler = "plms" if args.plms else args.sampler
        parse_sampler_and_schedule(sampler, args.schedule)  # fail on a bad name before loading anything
        if img2img:
            if not 0.0 < args.strength <= 1.0:
                raise ArgumentError(f"--strength must be in (0, 1], got {args.strength}")
            if not args.init_img.is_file():
                raise ArgumentError(f"--init-img {args.init_img} does not exist")
        for name, v in (("--H", args.H), ("--W", args.W)):
            if v is not None and (v <= 0 or v % 8):
                raise ArgumentError(f"{name} must be a positive multiple of 8, got {v}")
        if args.steps < 1:
            raise ArgumentError(f"--steps must be ≥ 1, got {args.steps}")
        if args.threads is not None:
            if args.threads < 1:
                raise ArgumentError(f"--threads must be ≥ 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        precision = {"full": "fp32"}.get(args.precision, args.precision)

        t0 = time.perf_counter()
        pipe = sdlite.load(args.ckpt, device=args.device, dtype=precision, prediction=args.prediction,
                           low_memory=args.low_memory, compile=args.compile, cuda_graphs=args.cuda_graphs)
        print(f"loaded {pipe} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        seed = args.seed
        if seed is None or seed == -1:
            import random

            seed = random.randrange(2**32)
        written = []
        for prompt in prompts:
            for it in range(args.n_iter):
                kwargs = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.scale,
                              width=args.W, height=args.H, seed=seed, sampler=sampler, schedule=args.schedule,
                              batch_size=args.n_samples, eta=args.eta, progress=not args.quiet,
                              clip_skip=args.clip_skip)
                if img2img:
                    images = pipe.img2img(args.init_img, prompt, strength=args.strength, **kwargs)
                else:
                    images = pipe.txt2img(prompt, **kwargs)
                for img, text in zip(images, images.infotexts):
                    written.append(save_numbered(img, args.outdir, text))
                seed += args.n_samples
        for path in written:
            print(path)
        print(f"{len(written)} image(s) in {time.perf_counter() - t0:.1f}s → {args.outdir}", file=sys.stderr)
        return 0
    except SdliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def txt2img_main(argv: Sequence[str] | None = None) -> int:
    return run(argv, img2img=False)


def img2img_main(argv: Sequence[str] | None = None) -> int:
    return run(argv, img2img=True)
