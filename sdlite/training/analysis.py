"""Read colour, shape and position of the one object in an image, and score prompt adherence.

No learned model: the object is whatever differs from the background, and its attributes
come from a few robust measurements.

1. The image is box-downsampled to at most 64x64 (fast, and averages away pixel noise) and
   blurred with a 3x3 [1 2 1] kernel.
2. Background = per-channel median of the 2-pixel border frame.
3. Foreground = pixels whose RGB distance to the background exceeds half the 99th percentile
   of that distance (so the threshold adapts to the contrast); nothing is found when that
   percentile is below :data:`MIN_CONTRAST`. Only the largest 4-connected component is kept,
   and nothing is found when it is smaller than :data:`MIN_AREA` of the image (a speck).
4. Colour = the palette colour whose hue is nearest to the hue of the median pixel of the
   (eroded, unblurred) component. Hue ignores brightness, so a dark orange is still orange;
   a component with almost no chroma (max - min channel < :data:`MIN_CHROMA`) has no colour.
5. Position = the component's bounding-box centre relative to the image centre: ``center``
   when both offsets are below :data:`CENTER_RADIUS` of the side, else the dominant axis
   decides ``left``/``right`` or ``top``/``bottom``.
6. Shape = the ideal template (circle, square, triangle pointing up or down) drawn in the
   component's bounding box that overlaps the component best (intersection over union).
   A perfect square fills its box (IoU with the circle 0.785, with a triangle 0.5), a circle
   fills 0.785, a triangle 0.5, so the templates are far apart.

Example::

    from sdlite.training import analysis, shapes
    analysis.analyse(shapes.render("red", "circle", "left"))
    # {'colour': 'red', 'shape': 'circle', 'position': 'left'}
"""

from __future__ import annotations

import colorsys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from sdlite.errors import ArgumentError
from sdlite.training.shapes import PALETTE_HUES, Attrs

ANALYSIS_SIZE = 64  # larger images are box-downsampled to this side first
MIN_CONTRAST = 30.0  # RGB distance (0-255 scale) below which the image counts as blank
MIN_AREA = 0.005  # smallest object, as a fraction of the image area
MIN_CHROMA = 25.0  # max - min channel (0-255) below which an object is grey, i.e. has no colour
CENTER_RADIUS = 0.125  # offsets below this fraction of the side count as "center"

ATTRIBUTES = ("colour", "shape", "position")


def analyse(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Colour, shape and position of the single object in an RGB image.

    ``image`` is a PIL image or a uint8 ``[H, W, 3]`` array. Returns
    ``{"colour": ..., "shape": ..., "position": ...}`` with the names of
    :mod:`sdlite.training.shapes`, ``None`` where nothing could be decided (all three for a
    blank image).

    Example: ``analyse(shapes.render("blue", "square", "top"))["shape"] == "square"``.
    """
    rgb = _as_float_rgb(image)
    h, w = rgb.shape[:2]
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)

    smooth = _blur3(rgb)
    frame = np.concatenate([smooth[:2].reshape(-1, 3), smooth[-2:].reshape(-1, 3),
                            smooth[:, :2].reshape(-1, 3), smooth[:, -2:].reshape(-1, 3)])
    background = np.median(frame, axis=0)
    distance = np.linalg.norm(smooth - background, axis=-1)
    contrast = float(np.percentile(distance, 99))
    if contrast < MIN_CONTRAST:
        return found
    mask = _largest_component(distance > contrast / 2)
    if mask.sum() < MIN_AREA * h * w:
        return found

    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    found["position"] = _position((x0 + x1) / 2 / w - 0.5, (y0 + y1) / 2 / h - 0.5)
    found["shape"] = _shape(mask[y0:y1, x0:x1])
    # Colour from the unblurred interior: erosion drops the antialiased, background-mixed rim.
    interior = _erode(mask)
    pixels = rgb[interior if interior.sum() >= 4 else mask]
    found["colour"] = _colour(np.median(pixels, axis=0))
    return found


def _as_float_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """float32 ``[h, w, 3]`` on the 0-255 scale, box-downsampled to at most ANALYSIS_SIZE."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ArgumentError(f"expected an RGB image array [H, W, 3], got shape {image.shape}")
        image = Image.fromarray(np.asarray(image[..., :3], dtype=np.uint8))
    image = image.convert("RGB")
    if max(image.size) > ANALYSIS_SIZE:
        w, h = image.size
        scale = ANALYSIS_SIZE / max(w, h)
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _blur3(x: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur with edge padding, over the first two axes."""
    p = np.pad(x, ((1, 1), (0, 0), (0, 0)), mode="edge")
    x = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False if the mask is empty).

    Every foreground pixel holds a label, the index of a pixel of its own component (at first
    itself). Each pass takes the minimum label over the 4-neighbourhood and then replaces each
    label by the label of the pixel it points to (pointer jumping, which makes the number of
    passes grow with the log of the component's size rather than its length). When nothing
    changes, each component carries a single label.
    """
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w  # the label of background pixels; index `big` of `flat` below maps to itself
    labels = np.full((h + 2, w + 2), big)  # one pixel of background padding all round
    labels[1:-1, 1:-1] = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        old = labels[1:-1, 1:-1]
        new = np.minimum.reduce([old, labels[:-2, 1:-1], labels[2:, 1:-1], labels[1:-1, :-2], labels[1:-1, 2:]])
        new[~mask] = big
        flat = np.append(new.ravel(), big)
        new = flat[flat[new]]
        if np.array_equal(new, old):
            break
        labels[1:-1, 1:-1] = new
    ids, counts = np.unique(new[mask], return_counts=True)
    return new == ids[np.argmax(counts)]


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _position(dx: float, dy: float) -> str:
    """Name the offset (dx, dy) of the object from the image centre, in fractions of the side."""
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _shape(box: np.ndarray) -> str:
    """Best-matching template for a boolean mask cropped to its bounding box."""
    h, w = box.shape
    v = ((np.arange(h) + 0.5) / h)[:, None]  # 0 at the top, 1 at the bottom
    u = ((np.arange(w) + 0.5) / w)[None, :]
    templates = {
        "square": np.ones_like(box),
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": 2 * np.abs(u - 0.5) <= v,  # apex up
        "triangle_down": 2 * np.abs(u - 0.5) <= 1 - v,
    }
    iou = {name: (box & t).sum() / (box | t).sum() for name, t in templates.items()}
    return max(iou, key=iou.get).removesuffix("_down")


def _colour(rgb: np.ndarray) -> str | None:
    """Palette colour with the nearest hue (circular distance), None for a grey."""
    if float(rgb.max() - rgb.min()) < MIN_CHROMA:
        return None
    hue = 360.0 * colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))[0]
    return min(PALETTE_HUES, key=lambda name: abs((hue - PALETTE_HUES[name] + 180) % 360 - 180))


def evaluate(
    generate: Callable[[str, int], Image.Image],
    prompts_with_attrs: Iterable[tuple[str, Attrs | Mapping[str, str] | Sequence[str]]],
    seeds: Iterable[int],
    keep_images: bool = False,
) -> dict[str, Any]:
    """Score how well ``generate(prompt, seed) -> PIL.Image`` draws what its prompts ask for.

    Every prompt is generated once per seed and read back with :func:`analyse`. Returns::

        {"n_prompts": int, "n_images": int, "seeds": [int, ...],
         "accuracy": {"colour": f, "shape": f, "position": f, "all": f},   # fractions correct
         "seconds_per_image": float,                                    # generation time only
         "records": [{"prompt", "seed", "expected", "found", "correct"}, ...],
         "images": [PIL.Image, ...]}                                    # only if keep_images

    ``"all"`` counts images whose three attributes are all correct. Scores are 0 when there
    are no images.

    Example::

        pipe = sdlite.load()
        evaluate(lambda p, s: pipe.txt2img(p, seed=s)[0], shapes.eval_prompts("heldout"), range(8))
    """
    seeds = [int(s) for s in seeds]
    items = [(prompt, _as_attrs(attrs)) for prompt, attrs in prompts_with_attrs]
    hits = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    seconds = 0.0
    for prompt, expected in items:
        for seed in seeds:
            start = time.perf_counter()
            image = generate(prompt, seed)
            seconds += time.perf_counter() - start
            found = analyse(image)
            correct = {k: found[k] == getattr(expected, k) for k in ATTRIBUTES}
            for k in ATTRIBUTES:
                hits[k] += correct[k]
            hits["all"] += all(correct.values())
            records.append({"prompt": prompt, "seed": seed, "expected": expected._asdict(),
                            "found": found, "correct": all(correct.values())})
            if keep_images:
                images.append(image)
    n = len(records)
    result: dict[str, Any] = {
        "n_prompts": len(items),
        "n_images": n,
        "seeds": seeds,
        "accuracy": {k: (v / n if n else 0.0) for k, v in hits.items()},
        "seconds_per_image": seconds / n if n else 0.0,
        "records": records,
    }
    if keep_images:
        result["images"] = images
    return result


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of :func:`evaluate` results keyed by a row name (e.g. the split).

    Example: ``print(markdown_table({"train": r1, "heldout": r2}))``.
    """
    lines = ["| split | images | colour | shape | position | all three | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        a = r["accuracy"]
        lines.append(f"| {name} | {r['n_images']} | {a['colour']:.1%} | {a['shape']:.1%} | "
                     f"{a['position']:.1%} | {a['all']:.1%} | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def _as_attrs(attrs: Attrs | Mapping[str, str] | Sequence[str]) -> Attrs:
    if isinstance(attrs, Mapping):
        return Attrs(*(attrs[k] for k in ATTRIBUTES))
    return Attrs(*attrs)
