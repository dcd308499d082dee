"""Prompt adherence of an sdlite model on the shapes data set, training vs held-out combinations.

Generates every canonical prompt of :mod:`sdlite.training.shapes` once per seed, reads the
picture back with :func:`sdlite.training.analysis.analyse` and prints the fraction of images
whose colour, shape, position (and all three) match the prompt, for the combinations seen in
training and the held-out ones separately.

Example::

    python scripts/evaluate.py --seeds 8 --out eval.json --grid eval.png
    python scripts/evaluate.py --ckpt my.safetensors --prompts 6 --seeds 2 --split heldout

Output (markdown)::

    | split | images | colour | shape | position | all three | s / image |
    |---|---:|---:|---:|---:|---:|---:|
    | train | 624 | ... |
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

# Run from a checkout without installing: make the repository's sdlite importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlite.training import analysis, shapes  # noqa: E402  (after the path fix above)

THUMB = 96  # grid cell side in pixels
LABEL_WIDTH = 280


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint to load (default: the bundled model)")
    p.add_argument("--seeds", type=int, default=8, help="images per prompt, seeds 0..N-1 (default 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the pipeline's)")
    p.add_argument("--prompts", type=int, default=None,
                   help="at most N prompts per split, evenly spread (default: all; for CI)")
    p.add_argument("--split", choices=("train", "heldout", "both"), default="both")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the samples here")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.prompts is not None and args.prompts < 1:
        p.error("--prompts must be >= 1")
    return args


def make_generator(args: argparse.Namespace) -> Callable[[str, int], Image.Image]:
    """Load the pipeline (imported here: it is heavy and only this step needs it)."""
    import sdlite

    pipe = sdlite.load(args.ckpt)
    # Pass steps/sampler only when given, so the pipeline's own defaults apply otherwise.
    options: dict[str, Any] = {}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.sampler is not None:
        options["sampler"] = args.sampler
    return lambda prompt, seed: pipe.txt2img(prompt, seed=seed, **options)[0]


def make_grid(rows: list[tuple[str, list[Image.Image], list[bool]]]) -> Image.Image:
    """One row per prompt: its label, then its samples, each framed green (all three
    attributes right) or red."""
    cols = max((len(images) for _, images, _ in rows), default=0)
    grid = Image.new("RGB", (LABEL_WIDTH + cols * THUMB, max(1, len(rows)) * THUMB), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images, correct) in enumerate(rows):
        y = r * THUMB
        draw.text((6, y + THUMB // 2 - 6), label, fill="black")
        for c, (image, ok) in enumerate(zip(images, correct)):
            x = LABEL_WIDTH + c * THUMB
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=(40, 170, 60) if ok else (215, 35, 35))
            grid.paste(image.convert("RGB").resize((THUMB - 6, THUMB - 6), Image.Resampling.LANCZOS), (x + 3, y + 3))
    return grid


def run(args: argparse.Namespace, generate: Callable[[str, int], Image.Image]) -> dict[str, dict[str, Any]]:
    """Evaluate each requested split; print the table; write --out and --grid if given."""
    splits = ("train", "heldout") if args.split == "both" else (args.split,)
    seeds = range(args.seeds)
    results = {}
    for split in splits:
        prompts = shapes.eval_prompts(split, limit=args.prompts)
        results[split] = analysis.evaluate(generate, prompts, seeds, keep_images=args.grid is not None)
    print(analysis.markdown_table(results))

    if args.grid is not None:
        rows = []
        for split, r in results.items():
            per_prompt = len(r["seeds"])
            for i in range(r["n_prompts"]):
                recs = r["records"][i * per_prompt:(i + 1) * per_prompt]
                rows.append((f"[{split}] {recs[0]['prompt']}", r["images"][i * per_prompt:(i + 1) * per_prompt],
                             [rec["correct"] for rec in recs]))
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        make_grid(rows).save(args.grid)
        print(f"grid: {args.grid}")
    for r in results.values():
        r.pop("images", None)  # PIL images are not JSON
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"args": config, "results": results}, indent=1))
        print(f"results: {args.out}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run(args, make_generator(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
