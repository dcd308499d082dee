"""The AUTOMATIC1111 "infotext": generation parameters stored in a PNG's ``parameters`` text chunk.

The layout is the one A1111 writes (``modules/processing.py`` ``create_infotext``) and reads back
(``modules/infotext_utils.py`` ``parse_generation_parameters``)::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The prompt and negative prompt are written raw (they may span several lines); only the values of the
last line are quoted (JSON) when they contain ``,``, ``:`` or a newline. A1111 itself, the PyPI
readers ``sd-parsers`` and ``sd-prompt-reader``, and CivitAI all recognise a PNG written by
:func:`save_png`.

Also here: the model hashes A1111 writes into ``Model hash:`` (the legacy 8-hex hash and the
10-hex "shorthash" of the file's SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import IO, Union

from PIL import Image, PngImagePlugin

__all__ = [
    "quote",
    "unquote",
    "format_infotext",
    "generation_params",
    "parse_infotext",
    "model_hash",
    "sha256_file",
    "short_hash",
    "make_pnginfo",
    "save_png",
    "read_infotext",
]

PathLike = Union[str, "os.PathLike[str]"]

# A1111's regex for one ``key: value`` item of the settings line; a value is either a JSON string
# (with backslash escapes) or anything up to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"

# What A1111's parser fills in when a key is absent (the subset that matters to sdlite).
_PARSE_DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic", "RNG": "GPU"}


# --------------------------------------------------------------------------------------------
# Writing and reading the text
# --------------------------------------------------------------------------------------------


def quote(value: object) -> object:
    """Quote a settings-line value as A1111 does: JSON-encode it only if it contains ``,`` ``\\n`` or ``:``.

    The value is returned unchanged (not even converted to ``str``) otherwise.

    >>> quote("Euler a"), quote("a, b")
    ('Euler a', '"a, b"')
    """
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Undo :func:`quote`: JSON-decode a value that starts and ends with ``"``; leave others alone.

    >>> unquote('"a, b"'), unquote("7")
    ('a, b', '7')
    """
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Build the infotext exactly as A1111's ``create_infotext``.

    ``params`` is the ordered settings dict (see :func:`generation_params`); ``None`` values are
    dropped, a value equal to its key is written as the bare key, other values go through :func:`quote`.
    The "Negative prompt:" line is present only when the negative prompt is non-empty.

    >>> format_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Eta": None})
    'a cat\\nSteps: 20, Sampler: Euler a, Seed: 1'
    """
    settings = ", ".join(
        k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None
    )
    negative_text = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{settings}".strip()


def _ui_number(x: float | int | None) -> float | int | None:
    # A1111's UI hands integral slider values over as ints, hence the common "CFG scale: 7".
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def generation_params(
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    schedule: str | None = None,
    model_hash: str | None = None,
    model_name: str | None = None,
    variation_seed: int | None = None,
    variation_strength: float | None = None,
    seed_resize_from: tuple[int, int] | None = None,
    denoising_strength: float | None = None,
    clip_skip: int | None = None,
    ensd: int | None = None,
    token_merging_ratio: float | None = None,
    eta: float | None = None,
    eta_key: str = "Eta",
    rng: str | None = None,
    extra: Mapping[str, object] | None = None,
    version: str | None = None,
) -> dict[str, object]:
    """The settings dict for :func:`format_infotext`, in A1111's key order.

    ``sampler`` and ``schedule`` are the A1111 labels ("DPM++ 2M", "Karras"); pass ``schedule=None``
    when the sampler's automatic schedule was used (A1111 then omits "Schedule type" and its parser
    reads the missing key as "Automatic"). ``seed`` is the seed of this very image (batch image i
    uses seed + i). ``variation_seed`` (this image's), ``variation_strength`` and ``seed_resize_from``
    (width, height) are A1111's seed tools (:mod:`sdlite.seeds`), written only when used, as is ``ensd``
    (the "Eta noise seed delta" of a sampler that used it). ``clip_skip`` is written only when > 1, ``token_merging_ratio`` only when not 0, as A1111
    does. ``rng``: A1111's "Random number generator source" where it is not its default "GPU" (sdlite draws
    its noise as A1111's "CPU" does). ``eta`` is written as ``eta_key``: A1111's k samplers record "Eta",
    its DDIM samplers "Eta DDIM". ``extra`` items go where
    A1111 puts ``extra_generation_params``: after the fixed keys, before "Version" (an extra key
    equal to a fixed one replaces its value in place).

    >>> generation_params(steps=20, sampler="Euler a", cfg_scale=7.0, seed=1, width=512, height=512)
    {'Steps': 20, 'Sampler': 'Euler a', 'Schedule type': None, 'CFG scale': 7, 'Seed': 1, 'Size': '512x512', \
'Model hash': None, 'Model': None, 'Variation seed': None, 'Variation seed strength': None, \
'Seed resize from': None, 'Denoising strength': None, 'Clip skip': None, 'ENSD': None, 'Token merging ratio': None, \
'RNG': None, 'Eta': None, 'Version': None}
    """
    params: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": _ui_number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Variation seed": variation_seed,
        "Variation seed strength": _ui_number(variation_strength),
        "Seed resize from": None if seed_resize_from is None else f"{seed_resize_from[0]}x{seed_resize_from[1]}",
        "Denoising strength": _ui_number(denoising_strength),
        "Clip skip": clip_skip if clip_skip is not None and clip_skip > 1 else None,
        "ENSD": ensd or None,
        "Token merging ratio": token_merging_ratio or None,
        "RNG": rng,
        eta_key: _ui_number(eta),
    }
    # Like A1111's dict literal ``{..., **extra_generation_params, "Version": ...}``: an extra key
    # that is already present replaces the value but keeps its place.
    params.update(extra or {})
    params["Version"] = version
    return params


def parse_infotext(text: str, fill_defaults: bool = True) -> dict[str, object]:
    """Parse an infotext with A1111's ``parse_generation_parameters`` rules.

    - The last line is the settings line only if it holds at least 3 ``key: value`` items;
      otherwise it belongs to the prompt.
    - Lines before the first one starting with "Negative prompt:" are the prompt, that line (minus
      the prefix) and the following ones the negative prompt; every line is stripped.
    - Quoted values are unquoted; a ``WxH`` value of key K becomes ``K-1`` = W and ``K-2`` = H
      (``Size-1``, ``Size-2``). All values stay strings; a key with an empty value is skipped.
    - With ``fill_defaults``, absent keys get A1111's defaults: ``Clip skip`` "1",
      ``Schedule type`` "Automatic", ``RNG`` "GPU".

    >>> p = parse_infotext("a cat\\nNegative prompt: dog\\nSteps: 20, Sampler: Euler, Size: 512x768")
    >>> p["Prompt"], p["Negative prompt"], p["Steps"], p["Size-1"], p["Size-2"]
    ('a cat', 'dog', '20', '512', '768')
    """
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    # A1111 skips joining onto an empty accumulator, so leading empty lines vanish; replicate that.
    res: dict[str, object] = {
        "Prompt": _join_like_a1111(prompt_lines),
        "Negative prompt": _join_like_a1111(negative_lines),
    }
    for key, value in _RE_PARAM.findall(lastline):
        if value == "":
            continue  # A1111 fails on ``v[0]`` of an empty value and skips the key
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = _RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
        else:
            res[key] = value

    if fill_defaults:
        for key, value in _PARSE_DEFAULTS.items():
            res.setdefault(key, value)
    return res


def _join_like_a1111(lines: list[str]) -> str:
    # A1111: ``s += ("" if s == "" else "\n") + line`` — a newline is added only once s is non-empty.
    out = ""
    for line in lines:
        out += ("" if out == "" else "\n") + line
    return out


# --------------------------------------------------------------------------------------------
# Model hashes (modules/sd_models.py, modules/hashes.py)
# --------------------------------------------------------------------------------------------


def model_hash(path: PathLike) -> str:
    """A1111's legacy 8-hex model hash: SHA-256 of the 64 KiB at offset 1 MiB of the file.

    Returns "NOFILE" for a missing file, as A1111 does.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def sha256_file(path: PathLike, block_size: int = 1 << 20) -> str:
    """Full SHA-256 of a file (hex), read in 1 MiB blocks; CivitAI calls this "AutoV2"."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            h.update(block)
    return h.hexdigest()


def short_hash(sha256: str) -> str:
    """The 10-hex "shorthash" that current A1111 writes as ``Model hash:``.

    >>> short_hash("6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa")
    '6ce0161689'
    """
    return sha256[0:10]


# --------------------------------------------------------------------------------------------
# PNG files
# --------------------------------------------------------------------------------------------


def make_pnginfo(text: str) -> PngImagePlugin.PngInfo:
    """A ``PngInfo`` carrying ``text`` under the keyword ``parameters``, as A1111 saves it.

    PIL writes a tEXt chunk when the text is Latin-1 and an iTXt (UTF-8) chunk otherwise; readers
    see both through ``Image.info`` / ``Image.text``.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def save_png(image: Image.Image, fp: PathLike | IO[bytes], text: str) -> None:
    """Save ``image`` as PNG with the infotext ``text`` and nothing else (no EXIF, no other chunks
    copied from ``image.info``). An empty ``text`` writes no text chunk at all (A1111's
    ``enable_pnginfo`` off).

    Writing no EXIF matters: sd-prompt-reader first tries to read JSON from EXIF tag 0x0110 and
    fails on a non-JSON value instead of falling back to the ``parameters`` chunk.

    >>> import io
    >>> buf = io.BytesIO(); save_png(Image.new("RGB", (8, 8)), buf, "a cat\\nSteps: 1, Sampler: Euler, Seed: 1")
    >>> read_infotext(Image.open(buf))
    'a cat\\nSteps: 1, Sampler: Euler, Seed: 1'
    """
    image.save(fp, format="PNG", pnginfo=make_pnginfo(text) if text else None)


def read_infotext(source: PathLike | IO[bytes] | Image.Image) -> str | None:
    """The ``parameters`` text of a PNG (a path, a binary file object or an open image), or None."""
    if isinstance(source, Image.Image):
        return _parameters_of(source)
    with Image.open(source) as image:
        return _parameters_of(image)


def _parameters_of(image: Image.Image) -> str | None:
    value = image.info.get("parameters")
    if value is None:
        # Text chunks after the image data are only seen once the file has been read to the end.
        value = getattr(image, "text", {}).get("parameters")
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value
