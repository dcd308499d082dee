"""Command lines of scripts/txt2img.py and scripts/img2img.py.

The flags of the original CompVis scripts (``--prompt --ckpt --outdir --ddim_steps --scale --seed --H --W
--n_samples --n_iter --precision --from-file --strength --init-img``) and the ones people expect today
(``--negative-prompt --steps --sampler --schedule --device``, img2img's ``--resize-mode``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import devices
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
            f = open(path, "xb")
        except FileExistsError:
            n += 1
            continue
        try:
            with f:
                save_png(image, f, text)
        except BaseException:  # Ctrl-C or a full disk mid-write: leave no truncated PNG behind
            path.unlink(missing_ok=True)
            raise
        return path


def _parser(img2img: bool) -> argparse.ArgumentParser:
    kind = "img2img" if img2img else "txt2img"
    p = argparse.ArgumentParser(prog=f"{kind}.py", description=(
        "Redraw an image under a text prompt." if img2img else "Generate images from a text prompt.")
        + " Without --ckpt, the bundled model is used.")
    p.add_argument("--prompt", type=str, default=None, help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="", help="what to avoid")
    p.add_argument("--from-file", dest="from_file", type=Path, default=None, help="one prompt per line")
    p.add_argument("--ckpt", type=Path, default=None, help="a .ckpt/.safetensors in the original layout")
    p.add_argument("--outdir", type=Path, default=Path(f"outputs/{kind}-samples"),
                   help="where the images go, as NNNNN.png numbered on after the highest number already there; "
                        "existing files are never overwritten (default: %(default)s)")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=20, help="sampling steps")
    p.add_argument("--sampler", default="euler_a", help="euler_a, euler, heun, lms, dpmpp_2m, ddim, plms, ddpm, ... "
                                                         "or A1111 names ('Euler a', 'DPM++ 2M Karras')")
    p.add_argument("--plms", action="store_true", help="use the PLMS sampler (CompVis flag)")
    p.add_argument("--schedule", default=None, help="automatic, karras, exponential, ... (default: the sampler's)")
    p.add_argument("--sampler-setting", dest="sampler_settings", action="append", default=[], metavar="NAME=VALUE",
                   help="one of A1111's sampler settings, repeatable: uni_pc_order=2, uni_pc_variant=bh2, "
                        "uni_pc_lower_order_final=false, uni_pc_skip_type=logSNR, beta_dist_alpha=0.5, beta_dist_beta=0.5")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (CFG)")
    p.add_argument("--ddim_eta", "--eta", dest="eta", type=float, default=None, help="eta of DDIM/ancestral samplers")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image i uses seed+i); -1 = random")
    p.add_argument("--variation-seed", dest="variation_seed", type=int, default=None,
                   help="A1111's variation seed, used with --variation-strength: every image keeps --seed and "
                        "image i moves towards the noise of variation seed + i (default or -1: random)")
    p.add_argument("--variation-strength", dest="variation_strength", type=float, default=0.0, metavar="S",
                   help="how far the starting noise moves towards the variation seed's: 0 (off, default) to 1; "
                        "0.05-0.2 keep the picture and change its details")
    p.add_argument("--seed-resize-from", dest="seed_resize_from", default=None, metavar="WxH",
                   help="A1111's 'Resize seed from': the size at which the seed was found, e.g. 512x512; its "
                        "noise is centred in the new size's, so the composition mostly survives")
    p.add_argument("--eta-noise-seed-delta", "--ensd", dest="ensd", type=int, default=0, metavar="N",
                   help="A1111's 'Eta noise seed delta' (ENSD in its infotexts, often 31337): the ancestral "
                        "samplers draw their noise from seed + N (default 0: off)")
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (default: the model's native size)")
    p.add_argument("--n_samples", type=int, default=1, help="batch size")
    p.add_argument("--n_iter", type=int, default=1, help="number of batches")
    p.add_argument("--precision", default=None, help="fp32 (= full), fp16, bf16, or autocast (fp32 weights under autocast; default: fp16 on CUDA, fp32 on the CPU; "
                   "on a CPU, bf16 weights take ~0.5x the fp32 time with AVX512-BF16/AMX, and elsewhere halve the "
                   "memory at 1.0-1.3x it; autocast without those is slow, and sdlite warns; --system-info says which)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda when available)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="override eps/v detection")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=1,
                   help="1 = the last CLIP layer (default); 2 = A1111's 'Clip skip 2' (the layer before it, "
                        "which many anime models were trained with); the model limits the largest value")
    p.add_argument("--token-merging-ratio", dest="token_merging_ratio", type=float, default=0.0, metavar="R",
                   help="token merging (ToMe, as A1111's setting): merge this share of the top level's tokens "
                        "before its self-attention, 0 (off, default) to 0.75; faster, less detail "
                        "(benchmarks/RESULTS.md has the speed)")
    p.add_argument("--low-memory", dest="low_memory", action="store_true",
                   help="chunked attention and tiled VAE decoding, for small GPUs (slightly slower)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet, on CUDA with its own CUDA graphs (compiles for about a minute "
                        "on a GPU, minutes on a CPU, at each new size; then 0.73x the time of a 512x512 image on "
                        "an H100, but slower than eager on a 2-core CPU: benchmarks/RESULTS-cuda.md, RESULTS-compile.md)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the UNet eagerly on CUDA instead of replaying CUDA graphs (the default there: "
                        "faster, holds one UNet call's activations; see benchmarks/RESULTS-cuda.md)")
    p.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="PyTorch's ops in place of sdlite's own kernels: on CUDA its GroupNorm instead of sdlite's "
                        "Triton kernels (no one-time build of those, ~8 s on a new machine, ~0.5 s per process, "
                        "but ~1.4x the time per 512x512 image on an H100: benchmarks/RESULTS-cuda.md); on an "
                        "x86 Linux CPU, attention without sdlite's C++ kernel (built once per machine, ~1 s; "
                        "without it a UNet step at 512x512 takes ~1.14x (fp32) to ~1.35x (bf16) as long on "
                        "AVX-512 CPUs) and, on AVX2 CPUs, 3x3 convolutions without its Winograd transforms "
                        "(~1.1x a 512x512 UNet step, ~1.5x a VAE decode)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core; 1 can be faster "
                        "when another program keeps a core busy)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, no notes (such as the one-time kernel build on CUDA)")
    if not img2img:
        p.add_argument("--system-info", dest="system_info", action="store_true",
                       help="print what sdlite runs on here (device, CPU instruction set, native bf16, threads, "
                            "its CPU attention kernel, GPU) and the fastest precision, then exit")
    if img2img:
        p.add_argument("--init-img", "--init_img", dest="init_img", type=Path, required=True, help="the image to redraw")
        p.add_argument("--strength", type=float, default=0.75,
                       help="in (0, 1]: near 0 keeps the image, 1 redraws it from noise (default: %(default)s)")
        p.add_argument("--resize-mode", "--resize_mode", dest="resize_mode", default="0",
                       help="how an image of another size becomes --W x --H, A1111's modes: 0 or just_resize "
                            "(stretch), 1 or crop (scale to cover, keep the centre), 2 or fill (scale to fit, "
                            "stretch the edges into the empty bands), 3 or latent (resize the encoded latent); "
                            "A1111's labels such as 'Crop and resize' work too (default: %(default)s)")
    return p


def _sampler_settings(pairs: list[str]) -> dict[str, Any]:
    """``--sampler-setting NAME=VALUE`` pairs → checked settings; each value is read as the type of the
    setting's A1111 default (true/false, an integer, a number or a word)."""
    from .schedulers import SAMPLER_SETTINGS, check_sampler_settings

    settings: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in SAMPLER_SETTINGS:
            raise ArgumentError(f"--sampler-setting {pair!r}: give NAME=VALUE with NAME one of "
                                f"{', '.join(SAMPLER_SETTINGS)}")
        default = SAMPLER_SETTINGS[name][2]
        try:
            if isinstance(default, bool):
                value: Any = {"true": True, "false": False}[text.lower()]
            else:
                value = type(default)(text)
        except (KeyError, ValueError):
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a word")
            raise ArgumentError(f"--sampler-setting {pair!r}: {name} takes {kind}") from None
        settings[name] = value
    return check_sampler_settings(settings)


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.from_file is not None and args.prompt is not None:
        raise ArgumentError("give --prompt or --from-file, not both")
    if args.from_file is not None:
        path = args.from_file
        if not path.exists():
            raise ArgumentError(f"--from-file {path} does not exist")
        if not path.is_file():
            raise ArgumentError(f"--from-file {path} is not a file; give a text file with one prompt per line")
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: Windows editors start UTF-8 files with a BOM
        except UnicodeDecodeError as e:
            raise ArgumentError(f"--from-file {path} is not UTF-8 text ({e}); save it as UTF-8") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ArgumentError(f"--from-file {path} has no prompts")
        return prompts
    if args.prompt is None:
        raise ArgumentError("give --prompt or --from-file")
    return [args.prompt]


def _first_seed(args: argparse.Namespace, n_images: int) -> int:
    """The seed of the first image; image i uses ``seed + i``, so the last one must fit too."""
    from .seeds import check_seed

    if args.seed is None or args.seed == -1:
        import random

        return random.randrange(2**32)
    check_seed(args.seed, n_images, "--seed")
    return args.seed


def _seed_tools(args: argparse.Namespace, n_images: int) -> tuple[int, tuple[int, int] | None]:
    """The first image's variation seed (image i uses it + i when --variation-strength is not 0) and
    --seed-resize-from as (width, height), checked."""
    from .seeds import check_seed

    if not math.isfinite(args.variation_strength):
        raise ArgumentError(f"--variation-strength must be a finite number, got {args.variation_strength}")
    variation_seed = args.variation_seed
    if variation_seed is None or variation_seed == -1:
        import random

        variation_seed = random.randrange(2**32)
    elif args.variation_strength:
        check_seed(variation_seed, n_images, "--variation-seed")
    resize_from = None
    if args.seed_resize_from is not None:
        w, sep, h = args.seed_resize_from.lower().partition("x")
        if not (sep and w.strip().isdigit() and h.strip().isdigit() and int(w) >= 8 and int(h) >= 8):
            raise ArgumentError(f"--seed-resize-from takes WIDTHxHEIGHT in pixels, each at least 8, such as "
                                f"512x512; got {args.seed_resize_from!r}")
        resize_from = (int(w), int(h))
    return variation_seed, resize_from


def _check_outdir(outdir: Path) -> None:
    """--outdir made now, before the model loads: a path that cannot be a directory of images fails here,
    not when the first image is saved, after all the work."""
    for p in (outdir, *outdir.parents):
        if p.exists():
            if not p.is_dir():
                raise ArgumentError(f"--outdir {outdir}: {p} exists and is not a directory; "
                                    "give a directory or a path that does not exist yet")
            break
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ArgumentError(f"--outdir {outdir}: cannot write images there ({e.strerror or e}); "
                            "give a directory you can write to") from None


class _LibraryNotes(logging.Handler):
    """The library's INFO notes on stderr while a command runs, such as the one-time build of the CUDA
    kernels, which otherwise leaves the first sampling step waiting for seconds without a word."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


@contextlib.contextmanager
def _library_notes(show: bool) -> Iterator[None]:
    logger = logging.getLogger("sdlite")
    if not show or logger.handlers:  # --quiet, or a program that set up its own logging
        yield
        return
    handler, level = _LibraryNotes(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(argv: Sequence[str] | None, img2img: bool) -> int:
    """Run the txt2img (or img2img) command line; returns the exit code (0, 2 = bad input, 130 = Ctrl-C).

    Every argument is checked before the model is loaded. Each image's path is printed when it is saved.

    >>> run(["--prompt", "a red circle on the left", "--seed", "1"], img2img=False)  # doctest: +SKIP
    """
    args = _parser(img2img).parse_args(argv)
    with _library_notes(show=not args.quiet):
        return _run(args, img2img)


def _run(args: argparse.Namespace, img2img: bool) -> int:
    written: list[Path] = []
    try:
        import sdlite
        from .schedulers import parse_sampler_and_schedule

        if getattr(args, "system_info", False):
            _apply_cpu_settings(args)
            print("\n".join(devices.system_report(args.device)))
            return 0
        prompts = _prompts(args)
        sampler = "plms" if args.plms else args.sampler
        spec, _ = parse_sampler_and_schedule(sampler, args.schedule)  # fail on a bad name before loading anything
        spec.check_eta(args.eta)
        if not math.isfinite(args.scale):
            raise ArgumentError(f"--scale must be a finite number, got {args.scale}")
        settings = _sampler_settings(args.sampler_settings)
        if img2img and not 0.0 < args.strength <= 1.0:
            raise ArgumentError(f"--strength must be in (0, 1], got {args.strength}")
        if img2img:
            from .resize import parse_resize_mode

            args.resize_mode = parse_resize_mode(args.resize_mode, "--resize-mode")
        for name, v in (("--H", args.H), ("--W", args.W)):
            if v is not None and (v <= 0 or v % 8):
                raise ArgumentError(f"{name} must be a positive multiple of 8, got {v}")
        if img2img:
            from .pipeline import _open_image

            _open_image(args.init_img)  # img2img's own checks: a readable image file of at least 8x8 px
        for name, v in (("--steps", args.steps), ("--n_samples", args.n_samples), ("--n_iter", args.n_iter),
                        ("--clip-skip", args.clip_skip)):
            if v < 1:
                raise ArgumentError(f"{name} must be ≥ 1, got {v}")
        from .unet import tome

        tome.check_ratio(args.token_merging_ratio)  # before the model loads
        n_images = args.n_samples * args.n_iter * len(prompts)
        seed = _first_seed(args, 1 if args.variation_strength else n_images)
        variation_seed, seed_resize_from = _seed_tools(args, n_images)
        devices.parse_device(args.device)  # a known device name, and one this machine has
        if args.ckpt is not None:
            from .checkpoint import check_path

            check_path(args.ckpt)
        _apply_cpu_settings(args)
        _check_outdir(args.outdir)  # the last check: it makes the folder
        precision = {"full": "fp32"}.get(args.precision, args.precision)

        t0 = time.perf_counter()
        pipe = sdlite.load(args.ckpt, device=args.device, dtype=precision, prediction=args.prediction,
                           low_memory=args.low_memory, compile=args.compile, cuda_graphs=args.cuda_graphs)
        print(f"loaded {pipe} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for prompt in prompts:
            for _ in range(args.n_iter):
                kwargs = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.scale,
                              width=args.W, height=args.H, seed=seed, sampler=sampler, schedule=args.schedule,
                              batch_size=args.n_samples, eta=args.eta, progress=not args.quiet,
                              clip_skip=args.clip_skip, sampler_settings=settings,
                              token_merging_ratio=args.token_merging_ratio, variation_seed=variation_seed,
                              variation_strength=args.variation_strength, seed_resize_from=seed_resize_from,
                              eta_noise_seed_delta=args.ensd)
                if img2img:
                    images = pipe.img2img(args.init_img, prompt, strength=args.strength,
                                          resize_mode=args.resize_mode, **kwargs)
                else:
                    images = pipe.txt2img(prompt, **kwargs)
                for img, text in zip(images, images.infotexts):
                    written.append(save_numbered(img, args.outdir, text))
                    print(written[-1], flush=True)  # a long run shows its results as they come
                if args.variation_strength:  # as A1111: the seed stays, the variation seed counts on
                    variation_seed += args.n_samples
                else:
                    seed += args.n_samples
        print(f"{len(written)} image(s) in {time.perf_counter() - t0:.1f}s → {args.outdir}", file=sys.stderr)
        return 0
    except SdliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The saved paths are already on stdout, one per line; 130 = 128 + SIGINT, as shells report Ctrl-C.
        print(f"interrupted: {len(written)} image(s) saved → {args.outdir}", file=sys.stderr)
        return 130


def _apply_cpu_settings(args: argparse.Namespace) -> None:
    """--threads and --no-fused-kernels, which hold for the whole process."""
    devices.set_threads(args.threads)
    if not args.fused_kernels:
        from . import ops

        ops.FUSED_GROUP_NORM = ops.FUSED_GELU = ops.FUSED_ATTENTION = ops.WINOGRAD_CONV = ()


def txt2img_main(argv: Sequence[str] | None = None) -> int:
    return run(argv, img2img=False)


def img2img_main(argv: Sequence[str] | None = None) -> int:
    return run(argv, img2img=True)
