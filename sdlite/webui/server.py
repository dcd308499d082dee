"""The web UI and an AUTOMATIC1111-compatible HTTP API, served by one process.

    python -m sdlite.webui                                   # http://127.0.0.1:7860
    python -m sdlite.webui --listen --port 7861 --api-auth me:secret --ckpt-dir ~/sd/models/Stable-diffusion

Clients written for the A1111 web UI (the ``webuiapi`` package, scripts posting to ``/sdapi/v1/txt2img``)
work unchanged: the routes, request fields and response shapes are A1111's (``modules/api/api.py``,
``modules/api/models.py``), the images are base64 PNGs carrying the A1111 infotext in their ``parameters``
chunk, and ``info`` is the JSON string of A1111's ``Processed.js()``.

How it is built:

- :class:`CheckpointList` lists ``--ckpt-dir`` (and the bundled model) the way A1111 lists
  ``models/Stable-diffusion``, answers to every name A1111 accepts for a model, and keeps **one** pipeline
  loaded (loaded lazily, on the first request that needs it).
- :class:`State` is A1111's ``shared.state`` for the running job: what ``GET /sdapi/v1/progress`` reports,
  and the interrupt/skip flags the pipeline callback reads (returning ``False`` stops sampling).
- :class:`Engine` turns a request into ``Pipeline.txt2img``/``img2img`` calls (``n_iter`` batches, seeds
  ``seed + i`` across all of them as A1111 does; with a ``subseed_strength``, ``seed`` for all and
  variation seeds ``subseed + i``). Every job runs on **one worker thread**, in arrival
  order, which is A1111's ``queue_lock``: concurrent requests queue, none is lost, and a failing or
  interrupted job leaves the server serving.
- :func:`create_app` is the FastAPI application: the API under ``/sdapi/v1/`` and the page (``static/``).

Not supported (refused with a 400 rather than silently ignored): hires fix (``enable_hr``),
inpainting (``mask``), more than one init image, ``tiling``, ``restore_faces``, and ``samples_format``
other than png. Variation seeds (``subseed``, ``subseed_strength``) and ``seed_resize_from_w``/``_h`` work
as in A1111 (:mod:`sdlite.seeds`).
img2img takes A1111's four ``resize_mode`` values (0 just resize, 1 crop and resize, 2 resize and fill, 3 latent
upscale; see :mod:`sdlite.resize`); any other value is a 400. ``save_images`` saves as A1111 does, under
``outputs/``. Fields this server does not know are ignored, as A1111 ignores them too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import gc
import io
import json
import logging
import math
import os
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .. import devices, infotext
from ..errors import ArgumentError, CheckpointError, SdliteError
from ..pipeline import BUNDLED_MODEL, VERSION, Pipeline, load
from ..seeds import check_seed
from ..resize import parse_resize_mode
from ..schedulers import (
    SAMPLER_SETTINGS,
    SAMPLERS,
    SCHEDULES,
    Sampler,
    check_sampler_settings,
    parse_sampler_and_schedule,
)
from ..unet import tome

try:
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the web UI needs FastAPI and uvicorn: pip install 'sdlite[webui]'") from e

log = logging.getLogger("sdlite.webui")

STATIC = Path(__file__).parent / "static"
DEFAULT_CKPT_DIR = Path("models") / "Stable-diffusion"
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")  # what A1111 lists in models/Stable-diffusion
MAX_SIZE = 2048  # width/height, A1111's UI maximum
MAX_STEPS = 150  # A1111's UI maximum
MAX_BATCH_SIZE = 64
MAX_N_ITER = 100
# A1111's token merging settings (Settings → Optimizations): txt2img, img2img (0: as txt2img), the hires fix's.
TOKEN_MERGING_OPTIONS = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")
# A1111's "Eta for ancestral samplers" and "Eta for DDIM", with its defaults: the eta of a request without one.
ETA_OPTIONS = {"eta_ancestral": 1.0, "eta_ddim": 0.0}


# =============================================================================================
# Errors: A1111's JSON error body {"error", "detail", "body", "errors"} with an HTTP status
# =============================================================================================


class ApiError(Exception):
    """A request the server refuses; ``status`` is the HTTP status (4xx: the client's fault)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, exc: BaseException, detail: Any = None) -> JSONResponse:
    """A1111's error body (``modules/api/api.py`` ``handle_exception``)."""
    message = str(exc)
    return JSONResponse(status_code=status, content={
        "error": type(exc).__name__, "detail": message if detail is None else detail, "body": "", "errors": message,
    })


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, CheckpointError):
        return 500  # the server's file is unusable; the request itself was fine
    if isinstance(exc, SdliteError):
        return 400  # ArgumentError, SamplerError: a bad value in the request
    return 500


# =============================================================================================
# Checkpoints
# =============================================================================================


@dataclass
class Checkpoint:
    """One model file, named as A1111 names it (``modules/sd_models.py`` ``CheckpointInfo``).

    ``name`` is the path relative to the checkpoint folder (the bare file name for the bundled model
    and ``--ckpt``); ``title`` is ``"name [shorthash]"`` once the file has been hashed (at its first load,
    as in A1111), else just ``name``."""

    path: Path
    name: str
    shorthash: str | None = None
    sha256: str | None = None  # the whole file's, once hashed

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def title(self) -> str:
        return self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"

    def ids(self) -> set[str]:
        """Every string that selects this model: name, title, model name, short hash (A1111's aliases)."""
        ids = {self.name, self.title, self.model_name}
        if self.shorthash:
            ids.add(self.shorthash)
        return ids

    def api(self) -> dict[str, Any]:
        """An item of ``GET /sdapi/v1/sd-models``."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": str(self.path), "config": None}


def _checkpoint_names(folder: Path) -> list[str]:
    """The checkpoint files under ``folder`` as sorted ``/``-separated paths relative to it.

    Symlinked files and sub-folders are followed, as A1111's ``os.walk(..., followlinks=True)`` does; a
    folder whose real path was already walked (a symlink loop, or two links to one folder) is skipped."""
    names: list[str] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        rel = Path(root).relative_to(folder)
        for f in files:
            if os.path.splitext(f)[1].lower() in CHECKPOINT_SUFFIXES and os.path.isfile(os.path.join(root, f)):
                names.append((rel / f).as_posix())
    return sorted(names)


class CheckpointList:
    """The models the server offers, and the one loaded pipeline.

    The folder is rescanned on every listing (cheap: names only). The bundled model, when installed, and
    an explicit ``--ckpt`` file are always listed first."""

    def __init__(self, ckpt_dir: Path | None, extra: Sequence[Path] = (), device: str | None = None,
                 dtype: str | None = None):
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.extra = [Path(os.path.abspath(p)) for p in extra]
        self.device, self.dtype = device, dtype
        self._hashes: dict[Path, str] = {}  # path → the file's sha256
        self._lock = threading.Lock()
        self._pipe: Pipeline | None = None
        self._pipe_path: Path | None = None

    def list(self) -> list[Checkpoint]:
        found: list[Checkpoint] = []
        fixed = [*self.extra, *([BUNDLED_MODEL] if BUNDLED_MODEL.is_file() else [])]
        for path in fixed:
            if path.is_file() and all(c.path != path for c in found):
                found.append(Checkpoint(path, path.name))
        if self.ckpt_dir is not None and self.ckpt_dir.is_dir():
            fixed_real = {os.path.realpath(p) for p in fixed}
            for name in _checkpoint_names(self.ckpt_dir):
                path = Path(os.path.abspath(self.ckpt_dir / name))  # symlinks kept: the name is what the folder shows
                if os.path.realpath(path) not in fixed_real:
                    found.append(Checkpoint(path, name))
        with self._lock:
            for c in found:
                c.sha256 = self._hashes.get(c.path)
                c.shorthash = c.sha256[:10] if c.sha256 else None
        return found

    def find(self, name: str) -> Checkpoint:
        """The checkpoint a name (title, name, model name or short hash) refers to; :class:`ApiError` 400 if none."""
        for c in self.list():
            if name in c.ids():
                return c
        raise ApiError(400, f"model {name!r} not found")

    def default(self) -> Checkpoint | None:
        models = self.list()
        return models[0] if models else None

    def pipeline(self, checkpoint: Checkpoint) -> Pipeline:
        """The loaded pipeline of ``checkpoint``; loads it (dropping the previous one first) when needed.

        Only the worker thread calls this, so loads never overlap."""
        if self._pipe is None or self._pipe_path != checkpoint.path:
            self._pipe, self._pipe_path = None, None
            gc.collect()  # free the old model before the new one takes its memory
            log.info("loading %s", checkpoint.path)
            pipe = load(checkpoint.path, device=self.device, dtype=self.dtype)  # pipe.name = the file's stem,
            # which is what A1111 writes as "Model:" and returns as sd_model_name
            sha256 = pipe.sha256  # A1111 hashes a model when it loads it
            with self._lock:
                self._hashes[checkpoint.path] = sha256
            self._pipe, self._pipe_path = pipe, checkpoint.path
        checkpoint.sha256 = self._hashes.get(checkpoint.path)
        checkpoint.shorthash = checkpoint.sha256[:10] if checkpoint.sha256 else None
        return self._pipe


# =============================================================================================
# Progress and the latent preview
# =============================================================================================

# A fixed linear map from SD's 4 latent channels (scaled latents) to RGB in [-1, 1]: the "cheap
# approximation" of the VAE decoder found by Keturn ("Decoding latents to RGB without upscaling",
# discuss.huggingface.co, 2022), which the A1111 web UI uses for its "Approx cheap" live preview.
LATENT_RGB = torch.tensor([
    #   R       G       B
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def latent_preview(latent: torch.Tensor, scale: int = 8) -> Image.Image:
    """A cheap preview of one latent ``[C, h, w]``: :data:`LATENT_RGB` (no VAE), upscaled ``scale``× (nearest).

    A latent with other than 4 channels shows its first three channels."""
    z = latent.detach().float().cpu()
    if z.shape[0] == LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->rhw", z, LATENT_RGB)
    else:
        rgb = z[:3] if z.shape[0] >= 3 else z[:1].expand(3, -1, -1)
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(arr)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


class State:
    """A1111's ``shared.state`` for the running job (``modules/shared_state.py``): counters for
    ``GET /sdapi/v1/progress`` and the interrupt/skip flags the sampling callback reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job, self.job_count, self.job_no, self.job_timestamp = "", 0, 0, "0"
        self.sampling_step = self.sampling_steps = 0
        self.interrupted = self.skipped = self.stopping_generation = False
        self.time_start = 0.0
        self.textinfo: str | None = None
        self._latent: torch.Tensor | None = None
        self._latent_step = -1
        self._preview: str | None = None
        self._preview_step = -1
        self.preview_scale = 8

    # -- the worker side --------------------------------------------------------------------

    def begin(self, job: str, job_count: int) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.sampling_step = self.sampling_steps = 0
            self.interrupted = self.skipped = self.stopping_generation = False
            self.time_start = time.time()
            self.textinfo = None
            self._latent, self._latent_step, self._preview, self._preview_step = None, -1, None, -1

    def next_job(self, job_no: int, sampling_steps: int) -> None:
        with self._lock:
            self.job_no, self.sampling_step, self.sampling_steps = job_no, 0, sampling_steps
            self.skipped = False

    def step(self, step: int, latent: torch.Tensor) -> None:
        with self._lock:
            self.sampling_step = step
            self._latent, self._latent_step = latent, self._latent_step + 1

    def end(self) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = "", 0, 0
            self.sampling_step = self.sampling_steps = 0
            self.textinfo = None
            self._latent = None

    # -- the API side ----------------------------------------------------------------------

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True

    def skip(self) -> None:
        with self._lock:
            self.skipped = True

    def dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "interrupted": self.interrupted,
                "stopping_generation": self.stopping_generation, "job": self.job, "job_count": self.job_count,
                "job_timestamp": self.job_timestamp, "job_no": self.job_no, "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps}

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The body of ``GET /sdapi/v1/progress`` (A1111's ``progressapi``, same formula)."""
        with self._lock:
            state = self.dict()
            if self.job_count == 0:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                        "textinfo": self.textinfo}
            progress = 0.01 + self.job_no / self.job_count
            if self.sampling_steps > 0:
                progress += self.sampling_step / self.sampling_steps / self.job_count
            elapsed = time.time() - self.time_start
            eta_relative = elapsed / progress - elapsed
            latent, latent_step = self._latent, self._latent_step
            textinfo = self.textinfo
        current_image = None
        if not skip_current_image and latent is not None:
            if latent_step != self._preview_step:
                buf = io.BytesIO()
                latent_preview(latent, self.preview_scale).save(buf, format="PNG")
                self._preview, self._preview_step = base64.b64encode(buf.getvalue()).decode(), latent_step
            current_image = self._preview
        return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state,
                "current_image": current_image, "textinfo": textinfo}


# =============================================================================================
# Requests (A1111's StableDiffusionTxt2ImgProcessingAPI / Img2ImgProcessingAPI, the fields sdlite uses)
# =============================================================================================


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``. Unknown fields are ignored; a wrong type gives 422 naming the field.

    ``width``/``height`` default to the model's native size (A1111: 512)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, allow_inf_nan=False)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    # Upper bounds keep one request from holding the single worker for hours or exhausting memory:
    # A1111's UI maxima for size (2048) and steps (150); batch_size × n_iter at most 6400 images.
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    n_iter: int = Field(1, ge=1, le=MAX_N_ITER)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, le=MAX_SIZE)
    height: int | None = Field(None, ge=8, le=MAX_SIZE)
    eta: float | None = Field(None, allow_inf_nan=False)
    denoising_strength: float | None = Field(None, allow_inf_nan=False)
    enable_hr: bool = False
    seed_resize_from_h: int = Field(-1, le=MAX_SIZE)  # A1111's "Resize seed from" (sdlite.seeds): on when both > 0
    seed_resize_from_w: int = Field(-1, le=MAX_SIZE)
    # A1111 features sdlite does not have: their defaults are accepted, anything else is a 400.
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    refiner_checkpoint: str | None = None
    tiling: bool | None = None
    restore_faces: bool | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: adds ``init_images`` (base64, optionally ``data:image/...;base64,``).

    The first init image is used for the whole batch, resized to ``width``×``height`` as ``resize_mode``
    says (A1111's 0–3, see :mod:`sdlite.resize`; default size: the image's, rounded down to a multiple of 8)."""

    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = Field(0.75, allow_inf_nan=False)
    resize_mode: int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


def decode_image(data: str, field: str = "image") -> Image.Image:
    """A base64 image, with or without a ``data:image/...;base64,`` prefix; :class:`ApiError` 400 if unreadable."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
        return image
    except UnidentifiedImageError:
        raise ApiError(400, f"{field}: not a base64-encoded image (decoded, but not in an image format PIL "
                            "reads: PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise ApiError(400, f"{field}: the image is too large to decode (over {Image.MAX_IMAGE_PIXELS} pixels, "
                            "PIL's limit against decompression bombs)") from None
    except (binascii.Error, ValueError, OSError, SyntaxError, EOFError) as e:  # (PIL's damaged files: the last two)
        raise ApiError(400, f"{field}: not a base64-encoded image ({e})") from None


def encode_png(image: Image.Image, pnginfo: bool = True) -> str:
    """Base64 PNG (no ``data:`` prefix, as A1111 returns it) with the image's infotext in ``parameters``
    (left out when ``pnginfo`` is false: A1111's ``enable_pnginfo`` option)."""
    buf = io.BytesIO()
    text = image.info.get("parameters") if pnginfo else None
    if text:
        infotext.save_png(image, buf, text)
    else:
        image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# =============================================================================================
# The engine: requests → pipeline calls, on one worker thread
# =============================================================================================


@dataclass
class Job:
    """A validated generation request."""

    kind: str  # "txt2img" or "img2img"
    request: Txt2ImgRequest
    sampler: Sampler
    schedule: str
    checkpoint: Checkpoint | None  # None: the model current when the job runs (after any switch queued before it)
    clip_skip: int
    init_image: Image.Image | None = None


class Engine:
    """Options, models, the progress state and the worker thread that runs every job in turn."""

    def __init__(self, checkpoints: CheckpointList):
        self.checkpoints = checkpoints
        self.state = State()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdlite-worker")
        default = checkpoints.default()
        # A1111's settings that sdlite honours (GET/POST /sdapi/v1/options); other keys are stored and echoed.
        self.options: dict[str, Any] = {
            "sd_model_checkpoint": default.title if default else None,
            "sd_checkpoint_hash": None,
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "enable_pnginfo": True,
            "live_previews_enable": True,
            # UniPC's options and the Beta schedule's shape, A1111's defaults (sdlite.schedulers.SAMPLER_SETTINGS)
            **{name: default for name, (_, _, default) in SAMPLER_SETTINGS.items()},
            # Token merging (sdlite.unet.tome), A1111's Optimizations settings; "_hr" is stored only (no hires fix)
            **{name: 0.0 for name in TOKEN_MERGING_OPTIONS},
            # The eta of a request that sends none (A1111's Sampler parameters): k samplers, DDIM samplers.
            **ETA_OPTIONS,
            # A1111's "Eta noise seed delta" (ENSD): the ancestral samplers' noise from seed + it (sdlite.seeds).
            "eta_noise_seed_delta": 0,
        }
        self._current: Checkpoint | None = default
        self.closing = False  # set by shutdown (Ctrl-C, SIGTERM)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread after every job queued before it."""
        return await asyncio.wrap_future(self._worker.submit(self._unless_closing, fn, *args))

    def _unless_closing(self, fn: Any, *args: Any) -> Any:
        if self.closing:
            raise ApiError(503, "the server is shutting down; this request was not run")
        return fn(*args)

    def shutdown(self) -> None:
        """Stop at once: interrupt the running generation; queued jobs answer 503 without running."""
        self.closing = True
        self.state.interrupt()
        self._worker.shutdown(wait=False)

    # -- options and models ----------------------------------------------------------------

    def current_checkpoint(self) -> Checkpoint:
        if self._current is None:
            self._current = self.checkpoints.default()
        if self._current is None:
            where = self.checkpoints.ckpt_dir or "--ckpt-dir"
            raise CheckpointError(f"no model to generate with: put a .safetensors/.ckpt checkpoint in {where} "
                                  "or start the server with --ckpt PATH")
        # refresh the title (the hash is known once loaded)
        return next((c for c in self.checkpoints.list() if c.path == self._current.path), self._current)

    def get_options(self) -> dict[str, Any]:
        options = dict(self.options)
        try:
            current = self.current_checkpoint()
            options["sd_model_checkpoint"] = current.title
            options["sd_checkpoint_hash"] = current.sha256
        except CheckpointError:
            options["sd_model_checkpoint"] = None
        return options

    def set_options(self, values: dict[str, Any]) -> None:
        """POST options: switching ``sd_model_checkpoint`` loads the model (on the worker, in turn)."""
        check_options(values)
        checkpoint = None
        if values.get("sd_model_checkpoint") is not None:
            checkpoint = self.checkpoints.find(str(values["sd_model_checkpoint"]))
        if checkpoint is not None or "CLIP_stop_at_last_layers" in values:
            target = checkpoint or self.current_checkpoint()
            pipe = self.checkpoints.pipeline(target)
            clip_skip = values.get("CLIP_stop_at_last_layers", self.options["CLIP_stop_at_last_layers"])
            max_skip = pipe.max_clip_skip
            if not 1 <= _clip_skip(clip_skip) <= max_skip:  # refused now, not at every later generation
                raise ApiError(400, f"CLIP_stop_at_last_layers must be in [1, {max_skip}] for {target.name}'s "
                                    f"text encoder (1 = its last layer), got {clip_skip!r}")
        if checkpoint is not None:
            self._current = checkpoint
        self.options.update({k: v for k, v in values.items() if k != "sd_model_checkpoint"})

    # -- generation -------------------------------------------------------------------------

    def prepare(self, kind: str, req: Txt2ImgRequest) -> Job:
        """Check a request before it queues, so a bad value is refused at once (400 with a message)."""
        if req.enable_hr:
            raise ApiError(400, "enable_hr: the hires fix is not supported by sdlite")
        for name in ("tiling", "restore_faces"):
            if getattr(req, name):
                raise ApiError(400, f"{name}: not supported by sdlite; send false")
        for name in ("script_name", "alwayson_scripts", "refiner_checkpoint"):  # A1111's scripts change the image
            if getattr(req, name):
                raise ApiError(400, f"{name}: sdlite runs no A1111 scripts or refiners; leave it out")
        for name in ("width", "height"):
            value = getattr(req, name)
            if value is not None and value % 8:
                raise ApiError(400, f"{name} must be a multiple of 8, got {value}")
        sampler, schedule = parse_sampler_and_schedule(req.sampler_name or req.sampler_index, req.scheduler)
        sampler.check_eta(req.eta)  # an ArgumentError: a 400 (DDIM has no step past eta 1)
        n_images = req.batch_size * req.n_iter
        if req.seed != -1:  # all batch_size × n_iter images, before any runs (one seed for all with variations)
            check_seed(req.seed, 1 if req.subseed_strength else n_images)
        if req.subseed != -1 and req.subseed_strength:
            check_seed(req.subseed, n_images, "subseed")
        resize_from = _seed_resize_from(req)
        if resize_from is not None and min(resize_from) < 8:
            raise ApiError(400, f"seed_resize_from_w/_h must be at least 8 (pixels) when both are set, got "
                                f"{req.seed_resize_from_w}x{req.seed_resize_from_h}")
        overrides = req.override_settings or {}
        check_options(overrides)
        checkpoint = None
        if overrides.get("sd_model_checkpoint"):
            checkpoint = self.checkpoints.find(str(overrides["sd_model_checkpoint"]))
        clip_skip = _clip_skip(overrides.get("CLIP_stop_at_last_layers", self.options["CLIP_stop_at_last_layers"]))
        init_image = None
        if isinstance(req, Img2ImgRequest):
            if req.mask:
                raise ApiError(400, "mask: inpainting is not supported by sdlite")
            if not req.init_images:
                raise ApiError(400, "init_images: img2img needs at least one init image")
            if not 0.0 < req.denoising_strength <= 1.0:
                raise ApiError(400, f"denoising_strength must be in (0, 1], got {req.denoising_strength}")
            if len(req.init_images) > 1:
                raise ApiError(400, f"init_images: sdlite takes one init image per request (used for the whole "
                                    f"batch), got {len(req.init_images)}; send one request per image")
            parse_resize_mode(req.resize_mode)  # an ArgumentError (400) listing the four modes
            init_image = decode_image(req.init_images[0], "init_images[0]")
            size = (req.width or init_image.width // 8 * 8, req.height or init_image.height // 8 * 8)
            if max(size) > MAX_SIZE:  # without width/height the image's own size is the output's
                raise ApiError(400, f"init_images[0] is {init_image.width}x{init_image.height}: without width and "
                                    f"height that is the output's size, and sdlite makes at most {MAX_SIZE} pixels "
                                    "a side; send a smaller image or a width and height")
        return Job(kind, req, sampler, schedule, checkpoint, clip_skip, init_image)

    def generate(self, job: Job) -> dict[str, Any]:
        """Run one job (on the worker thread) and build A1111's response body."""
        req, state = job.request, self.state
        state.begin(job.kind, req.n_iter)
        try:
            checkpoint = job.checkpoint or self.current_checkpoint()
            state.textinfo = f"Loading {checkpoint.title}"
            pipe = self.checkpoints.pipeline(checkpoint)
            state.textinfo = None
            state.preview_scale = pipe.vae_factor
            # The options as they are when the job runs (an options change queued before it applies to
            # it), clip skip among them; prepare() checked the value the request arrived with.
            job = dataclasses.replace(job, clip_skip=_clip_skip(self._option(job, "CLIP_stop_at_last_layers")))
            seed = random.randrange(4294967294) if req.seed == -1 else int(req.seed)
            # As A1111 fixes and counts them: with a variation strength every image keeps the seed and
            # the variation seed (subseed) counts up; without one the seed counts up.
            subseed = random.randrange(4294967294) if req.subseed == -1 else int(req.subseed)
            step = 0 if req.subseed_strength else 1
            strength = req.denoising_strength if job.kind == "img2img" else 1.0
            levels = job.sampler.levels(pipe.schedule, req.steps, job.schedule, strength=strength)
            n_steps = job.sampler.step_count(levels) or 0  # 0: unknown (DPM adaptive), progress counts whole jobs

            def callback(i: int, t: float, x: torch.Tensor) -> bool | None:
                # The preview shows the latent in the variance-preserving form x_t = sqrt(abar) x0 + sqrt(1-abar) eps:
                # the k-samplers' x = x0 + sigma eps is divided by sqrt(1 + sigma²).
                z = x[0].detach()
                if job.sampler.family == "k":
                    sigma = float(pipe.schedule.t_to_sigma(torch.tensor(t)))
                    z = z / math.sqrt(1.0 + sigma * sigma)
                state.step(i + 1, z.float().cpu().clone())
                return False if (state.interrupted or state.skipped or self.closing) else None

            images: list[Image.Image] = []
            for n in range(req.n_iter):
                if state.interrupted or self.closing:
                    break
                state.next_job(n, n_steps)
                kwargs = dict(negative_prompt=req.negative_prompt, steps=req.steps, guidance_scale=req.cfg_scale,
                              width=req.width, height=req.height, seed=seed + step * n * req.batch_size,
                              variation_seed=subseed + n * req.batch_size, variation_strength=req.subseed_strength,
                              seed_resize_from=_seed_resize_from(req),
                              eta_noise_seed_delta=int(self._option(job, "eta_noise_seed_delta")),
                              sampler=job.sampler.id, schedule=job.schedule, batch_size=req.batch_size,
                              eta=self._eta(job), callback=callback, clip_skip=job.clip_skip,
                              sampler_settings={name: self._option(job, name) for name in SAMPLER_SETTINGS},
                              token_merging_ratio=self._token_merging_ratio(job))
                if job.kind == "img2img":
                    images += pipe.img2img(job.init_image, req.prompt, strength=strength,
                                           resize_mode=req.resize_mode, **kwargs)
                else:
                    images += pipe.txt2img(req.prompt, **kwargs)
            if req.save_images:
                self._save(job, images)
            overrides = req.override_settings or {}
            if overrides and not req.override_settings_restore_afterwards:
                self.set_options(overrides)
            return self._response(job, pipe, images, seed, subseed)
        finally:
            state.end()

    def _option(self, job: Job, key: str) -> Any:
        """The option ``key`` for this job: its ``override_settings`` value, else the server's current one."""
        return (job.request.override_settings or {}).get(key, self.options[key])

    def _eta(self, job: Job) -> float:
        """A1111's rule: the request's ``eta``, else the option of the sampler's kind, ``eta_ddim`` for its
        timestep samplers (DDIM), ``eta_ancestral`` for the k samplers."""
        if job.request.eta is not None:
            return job.request.eta
        return float(self._option(job, "eta_ddim" if job.sampler.family == "timestep" else "eta_ancestral"))

    def _token_merging_ratio(self, job: Job) -> float:
        """A1111's rule: txt2img takes ``token_merging_ratio``; img2img its own ``token_merging_ratio_img2img``
        unless that is 0 or the request overrides ``token_merging_ratio``, then ``token_merging_ratio``."""
        ratio = float(self._option(job, "token_merging_ratio"))
        if job.kind == "img2img" and "token_merging_ratio" not in (job.request.override_settings or {}):
            return float(self._option(job, "token_merging_ratio_img2img")) or ratio
        return ratio

    def _save(self, job: Job, images: list[Image.Image]) -> None:
        """``save_images``: as A1111, into ``outputs/{txt2img,img2img}-images/`` under the server's working
        directory, numbered on after the highest number there (never overwriting)."""
        from ..cli import save_numbered

        pnginfo = self._option(job, "enable_pnginfo")
        outdir = Path.cwd() / "outputs" / f"{job.kind}-images"
        for image in images:
            path = save_numbered(image, outdir, image.info.get("parameters", "") if pnginfo else "")
            log.info("saved %s", path)

    def _response(self, job: Job, pipe: Pipeline, images: list[Image.Image], seed: int,
                  subseed: int) -> dict[str, Any]:
        req = job.request
        # As A1111's Processed: the seeds and prompts of every image asked for (an interrupted job
        # returns fewer images), the infotexts of those made.
        n = req.batch_size * req.n_iter
        seeds = [seed + (0 if req.subseed_strength else i) for i in range(n)]
        width, height = images[0].size if images else (req.width, req.height)
        infotexts = [im.info.get("parameters", "") for im in images]
        # The schedule type goes where A1111 puts it, in extra_generation_params, exactly when the infotext has it.
        written = infotext.parse_infotext(infotexts[0], fill_defaults=False) if infotexts else {}
        extra: dict[str, Any] = {"Schedule type": written["Schedule type"]} if "Schedule type" in written else {}
        for key in ("Eta", "Eta DDIM"):  # numbers, as A1111's p.extra_generation_params[eta_infotext_field]
            if key in written:
                extra[key] = float(written[key])
        for key in ("Beta schedule alpha", "Beta schedule beta"):  # numbers too: A1111's option values
            if key in written:
                extra[key] = float(written[key])
        info = {  # A1111's Processed.js(), key for key
            "prompt": req.prompt, "all_prompts": [req.prompt] * n,
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * n,
            "seed": seed, "all_seeds": seeds, "subseed": subseed, "all_subseeds": [subseed + i for i in range(n)],
            "subseed_strength": req.subseed_strength, "width": width, "height": height,
            "sampler_name": job.sampler.label, "cfg_scale": req.cfg_scale, "steps": req.steps,
            "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": req.denoising_strength if job.kind == "img2img" else None,
            "extra_generation_params": extra, "index_of_first_image": 0,
            "infotexts": infotexts, "styles": req.styles or [],
            "job_timestamp": self.state.job_timestamp, "clip_skip": job.clip_skip,
            "is_using_inpainting_conditioning": False, "version": VERSION,
        }
        parameters = req.model_dump()
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"], parameters["mask"] = None, None  # as A1111: not echoed back
        pnginfo = self._option(job, "enable_pnginfo")
        return {"images": [encode_png(im, pnginfo) for im in images] if req.send_images else [],
                "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}


def _seed_resize_from(req: Txt2ImgRequest) -> tuple[int, int] | None:
    """A1111's "Resize seed from" as (width, height), or None: it is on only when both are above 0."""
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        return req.seed_resize_from_w, req.seed_resize_from_h
    return None


def check_options(values: dict[str, Any]) -> None:
    """:class:`ApiError` (or, for a sampler setting, :class:`ArgumentError`): a 400 for an option value sdlite
    cannot honour, raised before anything is applied."""
    for key, value in values.items():  # a JSON integer has no size limit; Python's float() of a huge one fails
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ApiError(400, f"{key}: a number of {len(str(abs(value)))} digits is out of range")
    for key in ("live_previews_enable", "enable_pnginfo"):
        if key in values and not isinstance(values[key], bool):
            raise ApiError(400, f"{key} must be true or false, got {values[key]!r}")
    if "samples_format" in values and str(values["samples_format"]).lower() != "png":
        raise ApiError(400, f"samples_format: sdlite writes only png images, got {values['samples_format']!r}")
    if "CLIP_stop_at_last_layers" in values:
        _clip_skip(values["CLIP_stop_at_last_layers"])
    check_sampler_settings({k: v for k, v in values.items() if k in SAMPLER_SETTINGS})  # ArgumentError: a 400
    for key in TOKEN_MERGING_OPTIONS:
        if key in values:
            tome.check_ratio(values[key], key)  # ArgumentError: a 400
    for key in ETA_OPTIONS:
        if key in values and not (isinstance(values[key], (int, float)) and not isinstance(values[key], bool)
                                  and 0 <= values[key] < math.inf):
            raise ApiError(400, f"{key} must be a number ≥ 0, got {values[key]!r}")
    if "eta_noise_seed_delta" in values:
        value = values["eta_noise_seed_delta"]
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                                                      and abs(value) < 2**63)):
            raise ApiError(400, f"eta_noise_seed_delta must be a whole number (0 = off), got {value!r}")


def _clip_skip(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"CLIP_stop_at_last_layers must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ApiError(400, f"CLIP_stop_at_last_layers must be an integer >= 1, got {value!r}")
    return n


# =============================================================================================
# The application
# =============================================================================================

# A1111's schedulers list: which ones need the model's own sigmas ("need_inner_model").
_NEEDS_INNER_MODEL = {"sgm_uniform", "simple", "normal", "ddim", "beta"}


def create_app(ckpt_dir: str | Path | None = DEFAULT_CKPT_DIR, ckpt: str | Path | None = None,
               api_auth: str | None = None, device: str | None = None, dtype: str | None = None) -> FastAPI:
    """The FastAPI app: the page at ``/`` and the A1111 API under ``/sdapi/v1/``.

    ``api_auth``: ``"user:pass"`` (several separated by commas) enables HTTP Basic auth on the API and the page.

    >>> app = create_app("models/Stable-diffusion")           # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=7860)        # doctest: +SKIP
    """
    if ckpt is not None and not Path(ckpt).is_file():
        raise CheckpointError(f"{ckpt}: no such checkpoint file")
    engine = Engine(CheckpointList(Path(ckpt_dir) if ckpt_dir else None, [Path(ckpt)] if ckpt else [], device, dtype))
    credentials = _parse_auth(api_auth)
    basic = HTTPBasic(auto_error=False)

    def check_auth(cred: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if credentials is None:
            return
        ok = cred is not None and cred.username in credentials and secrets.compare_digest(
            cred.password.encode(), credentials[cred.username].encode())
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        engine.shutdown()

    app = FastAPI(title="sdlite", version=VERSION, dependencies=[Depends(check_auth)], lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error_response(exc.status_code, exc, detail=exc.detail)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422, ``{"detail": [...]}`` naming each bad field, with the input echoed as JSON can
        carry it: a raw JSON ``NaN`` or ``Infinity`` (which Python's parser takes) comes back as a string,
        where FastAPI's handler failed to write it and answered 500."""
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    @app.exception_handler(SdliteError)
    async def _sdlite_error(request: Request, exc: SdliteError) -> JSONResponse:
        return error_response(_status_of(exc), exc)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc)

    async def queued(fn: Any, *args: Any) -> Any:
        """Run on the worker; an unexpected exception becomes a 500 with A1111's error body, logged."""
        try:
            return await engine.run(fn, *args)
        except (ApiError, SdliteError):
            raise
        except Exception as exc:  # noqa: BLE001 - the server must keep serving
            log.exception("job failed")
            return error_response(500, exc)

    # -- the page ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- generation ----------------------------------------------------------------------------

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest) -> Any:
        return await queued(engine.generate, engine.prepare("txt2img", req))

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest) -> Any:
        return await queued(engine.generate, engine.prepare("img2img", req))

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return engine.state.progress(skip_current_image or not engine.options["live_previews_enable"])

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        engine.state.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip() -> dict[str, Any]:
        engine.state.skip()
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        if not req.image.strip():
            return {"info": "", "items": {}, "parameters": {}}
        image = decode_image(req.image.strip())
        text = infotext.read_infotext(image) or ""
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, (str, int, float))}
        return {"info": text, "items": items, "parameters": infotext.parse_infotext(text) if text else {}}

    # -- models, samplers, options -------------------------------------------------------------

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [c.api() for c in engine.checkpoints.list()]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        engine.checkpoints.list()

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.label, "aliases": [s.id, *s.aliases], "options": {k: str(v) for k, v in s.a1111_options}}
                for s in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": s.id, "label": s.label, "aliases": list(s.aliases) or None,
                 "default_rho": s.default_rho, "need_inner_model": s.id in _NEEDS_INNER_MODEL} for s in SCHEDULES]

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return engine.get_options()

    @app.post("/sdapi/v1/options")
    async def set_options(values: dict[str, Any]) -> Any:
        check_options(values)  # a bad value → 400 before queueing
        if values.get("sd_model_checkpoint") is not None:
            engine.checkpoints.find(str(values["sd_model_checkpoint"]))
        result = await queued(engine.set_options, values)
        return result  # None (JSON null), as A1111

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/script-info")
    def script_info() -> list[Any]:
        return []

    # -- what sdlite does not have: A1111's shapes, empty, so clients (webuiapi's get_*) work unchanged ----------

    for route in ("sd-vae", "upscalers", "latent-upscale-modes", "prompt-styles", "loras", "hypernetworks",
                  "face-restorers", "realesrgan-models"):
        app.add_api_route(f"/sdapi/v1/{route}", lambda: [], methods=["GET"], name=route)

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return {}

    @app.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        """A1111's ``{"ram": {free, used, total}, "cuda": ...}``; ``{"error": ...}`` where it cannot be read."""
        try:
            page, pages, avail = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
            ram: dict[str, Any] = {"free": avail * page, "used": (pages - avail) * page, "total": pages * page}
        except (ValueError, OSError, AttributeError):
            ram = {"error": "unavailable"}
        cuda: dict[str, Any] = {"error": "unavailable"}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            cuda = {"system": {"free": free, "used": total - free, "total": total},
                    "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}
        return {"ram": ram, "cuda": cuda}

    return app


def _parse_auth(api_auth: str | None) -> dict[str, str] | None:
    if not api_auth:
        return None
    creds = {}
    for item in api_auth.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise ArgumentError(f"--api-auth takes user:password (several separated by commas), got {item!r}")
        creds[user] = password
    return creds


# =============================================================================================
# Running it
# =============================================================================================


class ServerThread:
    """Serve an app with uvicorn on a background thread (tests, notebooks).

    >>> with ServerThread(create_app(), port=7861) as server:   # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 7860):
        self.host, self.port = host, port
        self.server = _server(app, host=host, port=port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="sdlite-webui", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web UI did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as a string ("nan", "inf"): strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdlite.webui``: serve the page and the API (the flags of A1111 where they exist)."""
    p = argparse.ArgumentParser(prog="python -m sdlite.webui", description=(
        "The sdlite web UI and an AUTOMATIC1111-compatible API (/sdapi/v1/...) on one port."))
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 (all interfaces), not only 127.0.0.1")
    p.add_argument("--api-auth", dest="api_auth", default=None,
                   help="user:password (comma-separated for several): HTTP Basic auth on the API and the page")
    p.add_argument("--ckpt-dir", dest="ckpt_dir", type=Path, default=DEFAULT_CKPT_DIR,
                   help=f"folder of .safetensors/.ckpt checkpoints (default {DEFAULT_CKPT_DIR})")
    p.add_argument("--ckpt", type=Path, default=None, help="a checkpoint to list first and start with")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--precision", dest="dtype", default=None, help="fp32, fp16, bf16, or autocast (fp32 weights under autocast; default: per device)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: one per core; fewer can be faster when another program "
                        "keeps a core busy)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        devices.set_threads(args.threads)
        devices.choose(args.device, args.dtype)  # a device this machine has and a known precision, before serving
        app = create_app(args.ckpt_dir, args.ckpt, args.api_auth, args.device, args.dtype)
        for line in devices.system_report(args.device):  # what generations will run on, as --system-info says
            log.info("%s", line)
    except SdliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models = app.state.engine.checkpoints.list()
    if not models:
        log.warning("no checkpoint found in %s and no bundled model: the page will list no model", args.ckpt_dir)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    log.info("sdlite web UI on http://%s:%d (%d model(s))", "127.0.0.1" if not args.listen else host, args.port,
             len(models))
    try:
        _server(app, host=host, port=args.port, log_level="warning").run()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the server's own handler is in place
        pass
    return 0


def _server(app: FastAPI, **config: Any) -> Any:
    """A uvicorn server whose Ctrl-C/SIGTERM handler first shuts the engine down, so the running
    generation is interrupted and queued jobs are dropped (uvicorn alone waits for every in-flight
    request to finish before the app's shutdown runs)."""
    import uvicorn

    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, **config))
