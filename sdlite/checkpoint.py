"""Read and write Stable Diffusion checkpoints in the original CompVis/Stability layout.

The networks are named exactly like the original modules, so loading is:

1. read the file safely (``.safetensors`` memory-mapped by our own reader, or a pickle ``.ckpt``
   through a restricted unpickler);
2. unwrap ``{"state_dict": ...}`` (possibly nested) and apply a few named fix-ups
   (EMA copies, ``position_ids``, the old CLIP layout without ``text_model.``, DDPM buffers);
3. detect the configuration from tensor *shapes* (never from the file name);
4. split the keys by the prefix table below and ``load_state_dict(strict=True, assign=True)``
   into modules built on the meta device, so the weights are never copied twice.

Any problem raises :class:`sdlite.CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import SD1, SD2, ModelConfig, UNetConfig
from .errors import ArgumentError, CheckpointError

# Checkpoint prefix → attribute of the Pipeline. SD1 stores the HF CLIPTextModel under
# `cond_stage_model.transformer.`, SD2 the OpenCLIP tower under `cond_stage_model.model.`.
PREFIXES: dict[str, str] = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.transformer.": "text_encoder",
    "cond_stage_model.model.": "text_encoder",
}

# The DDPM buffers `register_schedule` stores in every original file. sdlite recomputes the
# schedule in float64 from the config (fp16 files round these), so they are read and dropped.
DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
# Keys the original code keeps that are not weights of any network.
IGNORED_KEYS = frozenset(DDPM_BUFFERS) | {"model_ema.decay", "model_ema.num_updates", "logvar", "lvlb_weights"}

SD1_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
UNET_CONTEXT = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
METADATA_KEY = "sdlite_config"

SUFFIXES_PICKLE = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES_SAFETENSORS = (".safetensors",)


# ---------------------------------------------------------------------------------------------
# 1. Reading files safely
# ---------------------------------------------------------------------------------------------

class _Inert:
    """Stand-in for classes of training frameworks (PyTorch Lightning callbacks, OmegaConf
    hyper-parameters) that full training checkpoints pickle. Constructing or restoring it does
    nothing, so no framework code is imported or run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Modules whose classes are replaced by `_Inert` instead of being imported.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")

# Everything a weights checkpoint legitimately needs, as in the A1111 web UI's modules/safe.py.
_ALLOWED_GLOBALS: dict[str, set[str]] = {
    "collections": {"OrderedDict", "defaultdict"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch": {"Size", "Tensor", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
              "uint8", "bool", "device"},
    "torch.nn.parameter": {"Parameter"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "numpy.dtypes": {"Float64DType", "Float32DType", "Int64DType", "Int32DType", "UInt8DType", "BoolDType"},
    "_codecs": {"encode"},
    "builtins": {"set", "frozenset", "slice", "complex", "bytearray"},
    "__builtin__": {"set"},
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside the allowed ones: loading it could run code."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module.startswith(_INERT_MODULE_PREFIXES) or module in ("pytorch_lightning", "lightning", "omegaconf"):
            return _Inert
        raise _ForbiddenGlobal(f"global '{module}.{name}' is forbidden (it could run code)")


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler class and `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "sdlite_restricted_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def _refuse_torchscript(path: Path) -> None:
    """A TorchScript archive (``torch.jit.save``: a zip with ``constants.pkl`` and ``code/``) is not a
    state dict, and ``torch.load`` would hand it to ``torch.jit.load``, which runs the archive's own
    code (its ``__setstate__``) outside the restricted unpickler: refused before anything is read."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load reports it (truncated or corrupt)
    if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; loading it would "
                              "run its own code, so sdlite refuses it. Use the model's .safetensors or .ckpt.")


def _read_pickle(path: Path) -> tuple[Any, Callable[[torch.Tensor], None]]:
    """The unpickled object, and ``release`` for its tensors (see :func:`_page_releaser`)."""
    # weights_only=False is required to pass our own pickle_module; the restricted unpickler
    # is what keeps it safe (torch's weights_only mode alone rejects the Lightning callback
    # class that real full checkpoints such as sd-v1-4.ckpt carry).
    kwargs: dict[str, Any] = dict(map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    try:
        if zipfile.is_zipfile(path):  # the zip format: torch maps the file privately, like ours
            _refuse_torchscript(path)
            try:
                obj = torch.load(path, mmap=True, **kwargs)
            except _ForbiddenGlobal:
                raise
            except Exception:  # e.g. a file system that cannot map files: read it (errors surface below)
                return torch.load(path, **kwargs), _no_release
            # The C library is looked up only where the mapping was found: ctypes.CDLL(None)
            # fails on Windows, where there is no /proc/self/maps either.
            ranges = _mapped_ranges(path)
            return obj, (_page_releaser(ranges, _libc_dontneed()) if ranges else _no_release)
        return torch.load(path, **kwargs), _no_release  # legacy pickle: ordinary memory
    except CheckpointError:
        raise
    except _ForbiddenGlobal as e:  # (a damaged pickle is an UnpicklingError too, and is only corrupt: below)
        raise CheckpointError(f"{path}: refused to load: {e}. This file may try to run code; "
                              "only load checkpoints you trust, or a .safetensors version of it.") from None
    except Exception as e:  # truncated zip, bad magic number, EOF, ...
        raise CheckpointError(f"{path}: cannot read this file as a PyTorch checkpoint "
                              f"(truncated or corrupt?): {type(e).__name__}: {e}") from None


# safetensors dtype names → torch dtypes (https://github.com/huggingface/safetensors, "Format").
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def _no_release(tensor: torch.Tensor) -> None:
    pass


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Callable[[torch.Tensor], None]]:
    """Memory-map a ``.safetensors`` file; every tensor is a view into the mapping.

    The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape and
    byte range; ``__metadata__`` → strings), then the raw little-endian data. We read it ourselves
    rather than through ``safetensors.safe_open`` (which also maps the file) because the loader
    must know which memory is the file's: the returned ``release(tensor)`` tells the kernel to drop
    that tensor's pages once its converted copy exists. Without it, every page of a fp16 file read
    while converting to fp32 stays resident until the end, and the load peaks at file + model
    instead of about the model alone.

    The mapping is private (copy-on-write): writing to a tensor never changes the file. Pages are
    only read from disk when touched, so a tensor loaded in the file's own dtype costs nothing
    until used.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: cannot read this file as safetensors (truncated or corrupt?): {why}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise corrupt(f"the header says it is {n} bytes long, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep, a key twice
            raise corrupt(f"header is not a JSON object of unique keys in UTF-8 ({str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise corrupt("header is not a JSON object")
        mapping: Any = None  # the whole file: an mmap, or (where mapping fails) a bytearray
        if size > 8 + n:
            try:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # a file system that cannot map files: read it instead
                f.seek(0)
                mapping = bytearray(f.read())
                if len(mapping) != size:
                    raise corrupt(f"read {len(mapping)} of {size} bytes") from None
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # (absent, or null: both valid)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ is not a map of strings")
    start, data_size = 8 + n, size - 8 - n
    whole = torch.frombuffer(mapping, dtype=torch.uint8) if mapping is not None else torch.empty(0, dtype=torch.uint8)
    # The format's rules, as the safetensors package checks them: each entry a dtype, a shape of
    # natural numbers and two offsets; the tensors tile the data section, in order, without gaps or
    # overlaps (overlapping tensors would alias each other's memory).
    entries = []
    for key, info in header.items():
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if not (isinstance(info, dict) and info.get("dtype") in _SAFETENSORS_DTYPES and _naturals(shape)
                and _naturals(offsets) and len(offsets) == 2):
            raise corrupt(f"tensor {key!r}: unreadable entry {str(info)[:200]}")
        entries.append((offsets[0], offsets[1], key, _SAFETENSORS_DTYPES[info["dtype"]], shape))
    expected = 0
    for begin, end, key, dtype, shape in sorted(entries, key=lambda e: e[:2]):
        if begin != expected or not begin <= end <= data_size:
            raise corrupt(f"tensor {key!r} lies at bytes {begin}..{end} of a {data_size}-byte data section, "
                          f"where the tensors before it end at {expected}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"tensor {key!r}: {end - begin} bytes for shape {shape} of {dtype}")
        expected = end
    if expected != data_size:
        raise corrupt(f"the tensors end at byte {expected} of a {data_size}-byte data section")
    tensors: dict[str, torch.Tensor] = {}
    for begin, end, key, dtype, shape in entries:
        raw = whole[start + begin:start + end]
        if (start + begin) % dtype.itemsize:  # misaligned (writers other than safetensors' own): copy
            raw = raw.clone()
        tensors[key] = raw.view(dtype).view(shape)

    if not hasattr(mapping, "madvise"):  # not mapped (None, bytearray), or no madvise (Windows)
        return tensors, metadata, _no_release
    base = whole.data_ptr()
    release = _page_releaser([(base, base + size)],
                             lambda address, length: mapping.madvise(mmap.MADV_DONTNEED, address - base, length))
    return tensors, metadata, release


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a key appears twice: {[k for k, _ in pairs if sum(1 for j, _ in pairs if j == k) > 1][0]!r}")
    return out


def _naturals(value: Any) -> bool:
    """A list of natural numbers that fit 63 bits (JSON's true and 2.7 are not)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v < 2**63 for v in value)


def _page_releaser(ranges: list[tuple[int, int]], dontneed: Callable[[int, int], None]) -> Callable[[torch.Tensor], None]:
    """``release(tensor)``: drop the memory pages of a tensor that lies inside one of ``ranges``
    (address ranges of a private, read-only-used file mapping) with ``dontneed(address, length)``.

    Only whole pages inside the tensor are dropped, so its neighbours are untouched; reading the
    tensor again re-reads the file. Tensors outside every range are ignored: on ordinary memory
    ``MADV_DONTNEED`` would destroy data, so the ranges must come from the mapping itself."""
    page = mmap.PAGESIZE

    def release(tensor: torch.Tensor) -> None:
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        if any(lo <= first and last <= hi for lo, hi in ranges):
            first, last = -(-first // page) * page, last // page * page
            if last > first:
                dontneed(first, last - first)

    return release


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` privately (from /proc/self/maps; Linux).

    ``torch.load(mmap=True)`` does not say where it mapped the file, so the kernel is asked."""
    maps = Path("/proc/self/maps")
    if not maps.exists() or not hasattr(mmap, "MADV_DONTNEED"):
        return []
    st = os.stat(path)
    file_id = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    ranges = []
    for line in maps.read_text().splitlines():  # "lo-hi perms offset major:minor inode path"
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][3] != "p":  # private mappings only
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        if (major, minor, int(fields[4])) == file_id:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _libc_dontneed() -> Callable[[int, int], None]:
    """``madvise(address, length, MADV_DONTNEED)`` through the C library (for torch's own mapping)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lambda address, length: madvise(address, length, mmap.MADV_DONTNEED)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict and its metadata.

    Unwraps ``{"state_dict": ...}`` as often as it is nested (Lightning checkpoints; some
    ControlNet files nest it twice). Nothing in the file is executed.

    >>> sd, meta = read_checkpoint("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
    """
    tensors, metadata, _ = _open_checkpoint(Path(path))
    return tensors, metadata


_MAX_NESTING = 8


def check_path(path: str | Path) -> Path:
    """``path`` if it names a file with a checkpoint's extension, else :class:`CheckpointError` saying why
    (nothing is read: the CLI checks this before any other work)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" if not path.exists()
                              else f"{path}: is a directory, not a checkpoint file" if path.is_dir()
                              else f"{path}: not a regular file, not a checkpoint file")
    if path.suffix.lower() not in SUFFIXES_SAFETENSORS + SUFFIXES_PICKLE:
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; "
                              f"expected one of {', '.join(SUFFIXES_SAFETENSORS + SUFFIXES_PICKLE)}")
    return path


def _open_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Callable[[torch.Tensor], None]]:
    """:func:`read_checkpoint`, plus the file's ``release(tensor)`` (see :func:`_page_releaser`;
    a no-op for legacy non-zip pickles, read into ordinary memory)."""
    check_path(path)
    metadata: dict[str, str] = {}
    release = _no_release
    if path.suffix.lower() in SUFFIXES_SAFETENSORS:
        obj, metadata, release = _read_safetensors(path)
    else:
        obj, release = _read_pickle(path)
    for _ in range(_MAX_NESTING):  # Lightning wraps the weights in {"state_dict": ...}; a file may nest more
        if not (isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping)):
            break
        obj = obj["state_dict"]
    else:
        raise CheckpointError(f"{path}: 'state_dict' nested more than {_MAX_NESTING} deep (or in itself): "
                              "not a checkpoint sdlite can read")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; is it a Stable Diffusion checkpoint?")
    return tensors, metadata, release


# ---------------------------------------------------------------------------------------------
# 2. Named fix-ups
# ---------------------------------------------------------------------------------------------

def ema_key(unet_key: str) -> str:
    """The name LitEma gives the EMA copy of a UNet weight: ``model.`` dropped, dots removed.

    ``model.diffusion_model.input_blocks.0.0.weight`` → ``model_ema.diffusion_modelinput_blocks00weight``.
    """
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def apply_fixups(sd: dict[str, torch.Tensor], *, use_ema: bool, path: Path | str = "") -> dict[str, torch.Tensor]:
    """Return a new dict with the variants seen in the wild normalised to the layout of sd1.tsv/sd2.tsv."""
    out = dict(sd)
    # EMA: by default the plain weights (original inference config `use_ema: False`, as A1111).
    ema_keys = [k for k in out if k.startswith("model_ema.")]
    if use_ema:
        unet_keys = [k for k in out if k.startswith("model.diffusion_model.")]
        missing = [k for k in unet_keys if ema_key(k) not in out]
        if not ema_keys or missing:
            raise CheckpointError(f"{path}: use_ema=True but the file has no EMA copy of "
                                  f"{len(missing) or len(unet_keys)} UNet weights (e.g. {ema_key((missing or unet_keys)[0])}); "
                                  "load it with use_ema=False")
        for k in unet_keys:
            out[k] = out[ema_key(k)]
    for k in ema_keys:
        del out[k]
    # position_ids: int64, absent, or float (merges). It is always arange(77); the model computes it.
    for k in [k for k in out if k.endswith("embeddings.position_ids")]:
        del out[k]
    # Old CLIP layout (transformers < 4.?) and transformers 5.x state dicts lack `text_model.`.
    old = "cond_stage_model.transformer."
    for k in [k for k in out if k.startswith(old) and not k.startswith(old + "text_model.")]:
        out[old + "text_model." + k[len(old):]] = out.pop(k)
    for k in IGNORED_KEYS:
        out.pop(k, None)
    return out


# ---------------------------------------------------------------------------------------------
# 3. Configuration from shapes
# ---------------------------------------------------------------------------------------------

def detect_config(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path | str = "") -> ModelConfig:
    """Which model this is, from tensor shapes (or from sdlite's own metadata).

    - sdlite files carry their full config as JSON under the ``sdlite_config`` metadata key;
    - the UNet's input channels come from ``input_blocks.0.0.weight`` (4 txt2img, 5 SD2 depth,
      8 InstructPix2Pix, 9 inpainting);
    - SD2 has the OpenCLIP tower (``cond_stage_model.model.*``) and 1024-wide cross-attention.
    """
    if METADATA_KEY in metadata:
        try:
            return ModelConfig.from_json(metadata[METADATA_KEY])
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable '{METADATA_KEY}' metadata: {e}") from None
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError(f"{path}: an SDXL checkpoint (conditioner.embedders.*); sdlite loads Stable Diffusion "
                              "1.x and 2.x models only")
    if UNET_IN not in sd and any(k.startswith("module." + UNET_IN[:6]) for k in sd):
        raise CheckpointError(f"{path}: its keys start with 'module.' (saved from a DataParallel wrapper); save the "
                              "wrapped model's own state_dict, without the 'module.' prefix")
    if UNET_IN not in sd:
        some = ", ".join(list(sd)[:3])
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint in the original layout: no '{UNET_IN}' "
                              f"(first keys: {some}). Diffusers-format folders and LoRA/embedding files are not "
                              "full checkpoints.")
    for key, dims in ((UNET_IN, 4), (UNET_CONTEXT, 2)):
        if key in sd and sd[key].dim() != dims:
            raise CheckpointError(f"{path}: '{key}' has shape {list(sd[key].shape)}, not {dims} dimensions: "
                                  "not a Stable Diffusion checkpoint sdlite can read")
    in_channels = sd[UNET_IN].shape[1]
    context = sd[UNET_CONTEXT].shape[1] if UNET_CONTEXT in sd else None
    if any(k.startswith("cond_stage_model.model.") for k in sd) or context == 1024:
        base = SD2
    elif any(k.startswith("cond_stage_model.transformer.") for k in sd) or context == 768:
        base = SD1
    else:
        raise CheckpointError(f"{path}: cannot tell SD1 from SD2: no text encoder weights and no cross-attention "
                              "of width 768 or 1024")
    return base.with_(unet=_replace(base.unet, in_channels=in_channels))


def _replace(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


def read_prediction_yaml(path: Path) -> str | None:
    """``parameterization: "v"`` in a ``.yaml`` beside the checkpoint (the CompVis/A1111 convention)."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"), re.MULTILINE)
    if m is None:
        return "eps"
    if m.group(1) not in ("eps", "v"):
        raise CheckpointError(f"{yaml}: parameterization {m.group(1)!r} is neither 'eps' nor 'v'")
    return m.group(1)


@torch.no_grad()
def guess_v_prediction(unet: nn.Module, cfg: "UNetConfig") -> bool:
    """The test A1111 uses for SD2 files without a yaml (`is_using_v_parameterization_for_sd2`).

    At t=999 the latent is almost pure noise. An eps model then predicts roughly its input
    (eps ≈ x_t), while a v model predicts v = sqrt(ᾱ)·eps − sqrt(1−ᾱ)·x0 ≈ −x0, far below the
    input. With x = 0.5 everywhere, mean(out − x) < −1 means v-prediction.
    """
    p = next(unet.parameters())
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 77, cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx)
    return (out.float() - x.float()).mean().item() < -1


# ---------------------------------------------------------------------------------------------
# 4. Strict load into modules built on the meta device
# ---------------------------------------------------------------------------------------------

def split_by_prefix(sd: Mapping[str, torch.Tensor], path: Path | str = "") -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": {...}, "vae": {...}, "text_encoder": {...}}`` by the prefix table; stray keys are an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    stray = []
    for key, value in sd.items():
        for prefix, part in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} unexpected key(s) outside the known prefixes "
                              f"({', '.join(PREFIXES)}): {', '.join(stray[:5])}")
    return parts


def load_into(module: nn.Module, weights: dict[str, torch.Tensor], *, prefix: str, path: Path | str,
              device: torch.device, dtype: torch.dtype, release: Callable[[torch.Tensor], None] = _no_release,
              finish: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    """Check names and shapes against ``module`` (on meta), assign the file's tensors into it, then
    convert them to ``device`` and ``dtype`` one layer at a time.

    ``weights`` is emptied, so each file tensor can be freed as soon as its converted copy exists
    (the caller's argument would otherwise keep them all alive until return), and ``release`` is
    called on it then. A tensor already in the wanted dtype and device is kept as it is, not copied
    (for a memory-mapped file: the module reads the mapping). ``finish(layer)`` runs on each module
    right after its own tensors are converted: :func:`sdlite.load` packs the layer's weight there
    (:class:`sdlite.ops.Packer`), so the plain copy is freed before the next layer is converted,
    which reuses its memory instead of touching fresh pages. A file tensor kept as it is and then
    replaced by ``finish`` is released too (a packed fp32 weight read from an fp32 file); a conv
    weight that ``finish`` leaves plain until the conv's first call (:meth:`sdlite.ops.Conv2d.pack`)
    is released when that call lays it out."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [(k, tuple(expected[k].shape), tuple(weights[k].shape))
             for k in expected if k in weights and expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{path}: the weights do not fit the network ({prefix}*):"]
        if missing:
            lines.append(f"  {len(missing)} missing: " + ", ".join(prefix + k for k in missing[:5]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected: " + ", ".join(prefix + k for k in unexpected[:5]))
        for k, exp, got in wrong[:5]:
            lines.append(f"  wrong shape: {prefix}{k}: expected {list(exp)}, found {list(got)}")
        if len(wrong) > 5:
            lines.append(f"  ... and {len(wrong) - 5} more wrong shapes")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(weights, strict=True, assign=True)  # the file's tensors, as they are
    module.requires_grad_(False)  # an inference model (and finish may pack only weights without gradients)
    weights.clear()
    for layer in module.modules():
        kept = []  # file tensors the layer holds as they are (already in the wanted dtype and device)
        for name, v in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            c = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            if not c.is_contiguous():  # a pickle may hold strided views; kernels read the memory in order
                c = c.contiguous()
            if c is not v:  # .to() returns v itself when nothing had to change
                setattr(layer, name, nn.Parameter(c, requires_grad=False) if isinstance(v, nn.Parameter) else c)
                release(v)
            else:
                kept.append((name, v))
            del v, c
        if finish is not None:
            finish(layer)
            for name, v in kept:
                if getattr(layer, name) is not v:  # replaced by finish (packed): its file pages can go too
                    release(v)
                elif name == "weight" and getattr(layer, "packed", False):  # a conv laid out at its first call
                    layer.release_when_laid_out(release)
    return module.eval().requires_grad_(False)


def _prefix_of(part: str, cfg: ModelConfig) -> str:
    if part == "text_encoder":
        return "cond_stage_model.model." if cfg.text.kind == "openclip" else "cond_stage_model.transformer."
    return {"unet": "model.diffusion_model.", "vae": "first_stage_model."}[part]


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device as they are registered, and the
    ``torch.nn.init`` functions do nothing, so no weight memory is allocated or initialised: the
    weights are assigned from the file right after.

    The same effect as ``with torch.device("meta")``, without its cost here: on meta tensors
    ``init.normal_`` (nn.Embedding) imports torch's compiler stack on first use, ~2.5 s on a 2-core
    CPU, more than loading the bundled model. (accelerate's ``init_empty_weights`` and transformers'
    ``no_init_weights`` use the same two patches.) Not thread-safe while it is active."""
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    def skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    nn.Module.register_parameter = register_on_meta
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, skip)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(nn.init, name, fn)


def build_networks(cfg: ModelConfig) -> dict[str, nn.Module]:
    """The three networks for ``cfg``, on the meta device (no memory allocated)."""
    from .clip import build_text_encoder
    from .unet import UNetModel
    from .vae import AutoencoderKL

    with _parameters_on_meta():
        return {"unet": UNetModel(cfg.unet), "vae": AutoencoderKL(cfg.vae), "text_encoder": build_text_encoder(cfg.text)}


def state_dict_of(networks: Mapping[str, nn.Module], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The networks' weights under the original checkpoint key names."""
    out: dict[str, torch.Tensor] = {}
    for part in ("unet", "vae", "text_encoder"):
        prefix = _prefix_of(part, cfg)
        for k, v in networks[part].state_dict().items():
            out[prefix + k] = v
    return out


def save_checkpoint(networks: Mapping[str, nn.Module], cfg: ModelConfig, path: str | Path,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the networks as one ``.safetensors`` in the original layout, config in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: sdlite saves .safetensors only (no pickle)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a file name ending in .safetensors")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: exists; refusing to overwrite (pass overwrite=True)")
    tensors = {}
    for k, v in state_dict_of(networks, cfg).items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.detach().to("cpu").contiguous()
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={METADATA_KEY: cfg.to_json(), "format": "pt"})
        umask = os.umask(0)  # safetensors creates the file 0600; give it the permissions of any new file
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        tmp.replace(path)  # the whole file or nothing: the old one stays until the new one is complete
    except OSError as e:
        with contextlib.suppress(OSError):  # (no .partial left behind, where there can be one at all)
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write it ({e.strerror or e})") from None
    return path


def load_networks(path: str | Path, *, device: torch.device, dtype: torch.dtype, prediction: str | None = None,
                  use_ema: bool = False, config: ModelConfig | None = None,
                  finish: Callable[[nn.Module], Any] | None = None) -> tuple[ModelConfig, dict[str, nn.Module]]:
    """Read, fix up, detect, and load a checkpoint. Returns the config and the three networks.

    ``config`` overrides the detection (for non-standard models stored without sdlite metadata);
    ``finish`` runs on each layer once its weights are loaded (see :func:`load_into`)."""
    path = Path(path)
    raw, metadata, release = _open_checkpoint(path)
    # consume: drop each file tensor as soon as it is converted. That frees tensors read into
    # ordinary memory (legacy pickles); for memory-mapped files (.safetensors, zip .ckpt),
    # release() also drops the file pages a converted tensor was read from, so the load peaks at
    # about the converted model's size instead of file + model.
    return networks_from_state_dict(raw, metadata, path=path, device=device, dtype=dtype, prediction=prediction,
                                    use_ema=use_ema, config=config, consume=True, release=release, finish=finish)


def networks_from_state_dict(raw: dict[str, torch.Tensor], metadata: Mapping[str, str], *, path: Path | str,
                             device: torch.device | str, dtype: torch.dtype, prediction: str | None = None,
                             use_ema: bool = False, config: ModelConfig | None = None, consume: bool = False,
                             release: Callable[[torch.Tensor], None] = _no_release,
                             finish: Callable[[nn.Module], Any] | None = None,
                             ) -> tuple[ModelConfig, dict[str, nn.Module]]:
    """Steps 2–4 of the module docstring on an already-read state dict.

    ``raw`` is not modified unless ``consume=True``: then it is emptied, so that each tensor can be
    freed once it has been converted into the network (lower peak memory). ``release(tensor)`` is
    called on each file tensor that was converted into a copy, and ``finish(layer)`` on each layer
    once its tensors are converted (see :func:`load_into`)."""
    path = Path(path)
    device = torch.device(device)
    sd = apply_fixups(raw, use_ema=use_ema, path=path)
    cfg = config or detect_config(sd, metadata, path)
    parts = split_by_prefix(sd, path)
    del sd
    if consume:
        raw.clear()
    try:
        networks = build_networks(cfg)
    except (ArithmeticError, IndexError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its configuration cannot build the networks ({type(e).__name__}: {e}); "
                              "pass config= with the model's ModelConfig") from None
    for part, module in networks.items():
        load_into(module, parts.pop(part), prefix=_prefix_of(part, cfg), path=path, device=device, dtype=dtype,
                  release=release, finish=finish)
    if device.type == "meta":  # shape/key checks only
        return cfg, networks

    prediction = resolve_prediction(prediction, path, metadata, cfg, networks["unet"])
    if cfg.version == "sd2":  # native size: 768 for the v models (768-v-ema), 512 for the eps ones (512-base)
        cfg = cfg.with_(prediction=prediction, image_size=768 if prediction == "v" else 512)
    else:
        cfg = cfg.with_(prediction=prediction)
    return cfg, networks


def resolve_prediction(requested: str | None, path: Path, metadata: Mapping[str, str], cfg: ModelConfig,
                       unet: nn.Module) -> str:
    """eps or v, in this order: the caller's argument; a same-stem ``.yaml`` beside the file;
    sdlite's own metadata; for SD2 the weight test of :func:`guess_v_prediction`; else eps (SD1)."""
    if requested is not None:
        if requested not in ("eps", "v"):
            raise ArgumentError(f"prediction must be 'eps' or 'v', not {requested!r}")
        return requested
    if (from_yaml := read_prediction_yaml(path)) is not None:
        return from_yaml
    if METADATA_KEY in metadata:
        return cfg.prediction
    if cfg.version == "sd2":
        return "v" if guess_v_prediction(unet, cfg.unet) else "eps"
    return "eps"


def iter_keys(lines: Iterable[str]) -> Iterable[tuple[str, tuple[int, ...], str]]:
    """Parse the ``key<TAB>shape<TAB>dtype`` lines of the sd-keys lists (used by tests and tools)."""
    for line in lines:
        if not line.strip():
            continue
        key, shape, dtype = line.rstrip("\n").split("\t")
        yield key, tuple(int(s) for s in shape.split(",") if s), dtype
