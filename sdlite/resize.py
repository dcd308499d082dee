"""A1111's img2img resize modes: how an init image of any size becomes ``width``×``height``.

    >>> from PIL import Image
    >>> from sdlite.resize import resize_image
    >>> resize_image(Image.new("RGB", (40, 20)), 32, 32, "crop").size
    (32, 32)

The four modes of the A1111 web UI (its img2img "Resize mode" radio, ``resize_mode`` in its API):

- 0 ``"just_resize"`` ("Just resize"): stretch the image to ``width``×``height``.
- 1 ``"crop"`` ("Crop and resize"): scale it, keeping its aspect ratio, until it covers the target,
  and keep the centre.
- 2 ``"fill"`` ("Resize and fill"): scale it, keeping its aspect ratio, until it fits inside the
  target, centre it, and fill the two empty bands by stretching the image's outermost edge.
- 3 ``"latent"`` ("Just resize (latent upscale)"): encode the image at its own size and resize the
  latent instead (done by :meth:`sdlite.Pipeline.img2img`; :func:`resize_image` does modes 0–2).

Modes 0–2 reproduce A1111's ``modules/images.py: resize_image`` with its default
``upscaler_for_img2img`` ("None": every resize is PIL's Lanczos), including its integer arithmetic,
so an image gets the same pixels as in the web UI.
"""

from __future__ import annotations

from PIL import Image

from .errors import ArgumentError

JUST_RESIZE, CROP, FILL, LATENT = 0, 1, 2, 3

# mode → (sdlite's name, A1111's label); each of the three spellings selects the mode.
RESIZE_MODES = {
    JUST_RESIZE: ("just_resize", "Just resize"),
    CROP: ("crop", "Crop and resize"),
    FILL: ("fill", "Resize and fill"),
    LATENT: ("latent", "Just resize (latent upscale)"),
}


def parse_resize_mode(value: int | str, name: str = "resize_mode") -> int:
    """The mode number (0–3) of ``value``: the A1111 integer, the same as a string (what a command line
    or a form sends), sdlite's name or A1111's label (names and labels in any case). Anything else is an
    :class:`ArgumentError` listing the valid values; ``name``: how the caller's user spells the argument.

    >>> parse_resize_mode("Crop and resize"), parse_resize_mode("fill"), parse_resize_mode(3)
    (1, 2, 3)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value in RESIZE_MODES:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) in RESIZE_MODES:
            return int(text)
        for mode, spellings in RESIZE_MODES.items():
            if text.lower() in (s.lower() for s in spellings):
                return mode
    valid = "; ".join(f'{mode} = "{short}" = "{label}"' for mode, (short, label) in RESIZE_MODES.items())
    raise ArgumentError(f"{name} must be one of: {valid}; got {value!r}")


def resize_image(image: Image.Image, width: int, height: int, mode: int | str = JUST_RESIZE) -> Image.Image:
    """``image`` as a ``width``×``height`` image, resized as A1111's resize mode 0, 1 or 2 does
    (``mode``: anything :func:`parse_resize_mode` takes). Returns a new image; an image that already
    has the target size comes back with the same pixels in every mode.

    >>> resize_image(Image.new("RGB", (20, 40)), 32, 32, "fill").size
    (32, 32)
    """
    mode = parse_resize_mode(mode)
    if mode == LATENT:
        raise ArgumentError('resize_mode 3 ("latent") resizes the encoded latent, not the image: pass it to '
                            "Pipeline.img2img, or give resize_image a mode from 0 to 2")
    if width < 1 or height < 1:
        raise ArgumentError(f"the target size must be at least 1x1, got {width}x{height}")
    if mode == JUST_RESIZE:
        # PIL returns an unchanged copy when the size already matches, as in A1111 (same call).
        return image.resize((width, height), Image.Resampling.LANCZOS)

    # The scaled size keeps the aspect ratio: one side is the target's, the other is computed with
    # A1111's floor division (``im.width * height // im.height``), compared in floats as A1111 does.
    # "Crop" matches the side that makes the image cover the target, "fill" the side that keeps it inside.
    # max(1, ...): a sliver (8x2000 px) would scale to no pixels at all, where A1111 fails.
    target_wider = width / height > image.width / image.height
    target_narrower = width / height < image.width / image.height
    if (mode == CROP and target_wider) or (mode == FILL and target_narrower):
        scaled = (width, max(1, image.height * width // image.width))
    else:
        scaled = (max(1, image.width * height // image.height), height)  # also equal ratios
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    # A1111 pastes the scaled image at (width // 2 - w // 2, height // 2 - h // 2): of an odd excess,
    # crop cuts the extra pixel on the right/bottom, and fill gives it to the left/top band.
    x = width // 2 - scaled[0] // 2
    y = height // 2 - scaled[1] // 2
    if mode == CROP:  # x, y <= 0: the box of the scaled image that lands on the target
        return resized.crop((-x, -y, -x + width, -y + height))

    out = Image.new(image.mode, (width, height))
    out.paste(resized, (x, y))
    w, h = scaled
    # The bands: A1111 resizes a zero-thickness box on the edge of the scaled image to the band's size,
    # with PIL's default filter (bicubic). Every band row (column) is then the same: the edge row
    # (column) extrapolated from the two outermost ones, 1.125·edge − 0.125·next, rounded and clipped.
    # Each band is as thick as the top/left gap; the bottom/right one may be a pixel thinner and is
    # clipped by the paste. A1111 would fail on a zero-thickness band (an odd target size): skipped here.
    if y > 0:
        out.paste(resized.resize((width, y), Image.Resampling.BICUBIC, box=(0, 0, w, 0)), (0, 0))
        out.paste(resized.resize((width, y), Image.Resampling.BICUBIC, box=(0, h, w, h)), (0, y + h))
    if x > 0:
        out.paste(resized.resize((x, height), Image.Resampling.BICUBIC, box=(0, 0, 0, h)), (0, 0))
        out.paste(resized.resize((x, height), Image.Resampling.BICUBIC, box=(w, 0, w, h)), (x + w, 0))
    return out
