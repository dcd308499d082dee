"""The Pipeline: prompt → conditioning → the one sampling loop → VAE decode → images.

    >>> import sdlite
    >>> pipe = sdlite.load()                      # the bundled model  # doctest: +SKIP
    >>> images = pipe.txt2img("a red circle on the left", seed=1)   # doctest: +SKIP
    >>> from sdlite.infotext import save_png      # a PNG that keeps A1111's settings text
    >>> save_png(images[0], "out.png", images.infotexts[0])  # doctest: +SKIP

Data flow (see docs/how-it-works.md):
``tokenizer → text_encoder → context``; ``seed → noise``; ``sampler(denoiser(unet)) → latent``;
``vae.decode(latent / scale_factor) → image``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from . import devices, ops
from .config import ModelConfig
from .errors import ArgumentError, CheckpointError, GenerationError
from .progress import ProgressBar
from .seeds import check_seed, random_streams
from .unet import tome

if TYPE_CHECKING:  # for the annotation; the methods import the schedulers where they use them
    from .cuda_graphs import GraphedCall
    from .schedulers import DiscreteSchedule

log = logging.getLogger("sdlite")

BUNDLED_MODEL = Path(__file__).parent / "assets" / "sdlite-shapes.safetensors"
VERSION = "sdlite 0.1.0"

StepCallback = Callable[[int, float, torch.Tensor], Any]


class Images(list):
    """A list of PIL images, plus the seeds and A1111 infotexts that made them.

    Each image also carries its infotext in ``image.info["parameters"]`` (written into PNGs by
    :func:`sdlite.infotext.save_png`).
    """

    seeds: list[int]
    variation_seeds: list[int] | None  # None when no variation strength was given
    infotexts: list[str]


class Pipeline:
    """Holds ``tokenizer``, ``text_encoder``, ``unet``, ``vae``, ``scale_factor`` and ``config``.

    Build it with :func:`sdlite.load`. All generation goes through :meth:`txt2img` and
    :meth:`img2img`, which share one sampling loop (:meth:`sample`).
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                 config: ModelConfig, precision: devices.Precision, name: str = "model",
                 path: Path | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.config = config
        self.precision = precision
        self.name = name
        self.path = path
        self.scale_factor = config.scale_factor
        self._hash: str | None = None
        self._vae_tile: int | None = None
        self._attention_chunk: int | None = None
        self._unet_graphs: GraphedCall | None = None
        self._compiled_graphs = False  # compiled by :meth:`compile` on CUDA, so maybe replaying CUDA graphs

    @functools.cached_property
    def schedule(self) -> "DiscreteSchedule":
        """The noise schedule of the forward process, computed in float64 from the config (not from
        the file's buffers, which fp16 files round). Sampling and training both use this object."""
        from .schedulers import DiscreteSchedule

        return DiscreteSchedule.from_config(self.config)

    # -- small facts ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def latent_channels(self) -> int:
        return self.config.vae.embed_dim

    @property
    def vae_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def max_clip_skip(self) -> int:
        """The largest ``clip_skip``: 1 takes the text encoder's usual output layer, each step one layer earlier."""
        return self.config.text.layers - self.config.text.skip_last_layers

    @property
    def sha256(self) -> str | None:
        """The checkpoint file's sha256 (hex), read once; None for a pipeline built without a file."""
        if self._hash is None and self.path is not None and Path(self.path).is_file():
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._hash = h.hexdigest()
        return self._hash

    @property
    def model_hash(self) -> str:
        """A1111's short hash: the first 10 hex digits of the file's sha256 (zeros without a file)."""
        return (self.sha256 or "0" * 10)[:10]

    def __repr__(self) -> str:
        c = self.config
        return (f"Pipeline({self.name!r}, version={c.version}, prediction={c.prediction}, "
                f"in_channels={c.in_channels}, size={c.image_size}, device={self.device}, "
                f"dtype={self.precision.weight_dtype})")

    # -- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        """Conditioning ``[B, 77·k, C]`` for a list of prompts, with A1111 prompt syntax.

        ``(word:1.3)``, ``[word]``, ``BREAK`` and prompts over 75 tokens (split into 77-token chunks
        encoded separately and concatenated) are handled by :mod:`sdlite.prompt`. A plain prompt of
        ≤ 75 tokens gives exactly ``text_encoder(tokenizer([prompt]))``.
        """
        return self.encode_prompts([prompts], clip_skip)[0]

    @torch.no_grad()
    def encode_prompts(self, groups: Sequence[Sequence[str]], clip_skip: int = 1) -> list[torch.Tensor]:
        """:meth:`encode_prompt` for several lists (e.g. prompts and negative prompts) at once.

        Every distinct prompt is encoded once, and all of their 77-token chunks go through the
        text encoder as one batch: a batch of 8 with one prompt and one negative prompt costs one
        text-encoder call of 2 chunks, not 16 calls. Within a list, shorter prompts are padded with
        the empty prompt's chunk to the longest (A1111 does the same).
        """
        from .prompt import apply_weights, tokenize_prompt, unsupported_syntax

        tok = self.tokenizer
        groups = [list(g) for g in groups]
        if any(not g for g in groups):
            raise ArgumentError("encode_prompts: every list needs at least one prompt")
        distinct = list(dict.fromkeys(p for g in groups for p in g))
        for p in distinct:
            found = unsupported_syntax(p)
            if found:
                warnings.warn(f"sdlite does not run A1111's {', '.join(found)}: it reads them as plain text "
                              f"in {p[:60]!r}", UserWarning, stacklevel=3)
        chunks = {p: tokenize_prompt(p, tok.encode, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
                  for p in distinct}
        padded = any(len({len(chunks[p]) for p in g}) > 1 for g in groups)
        if padded and "" not in chunks:
            chunks[""] = tokenize_prompt("", tok.encode, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
        order = list(chunks)
        ids = torch.tensor([c.ids for p in order for c in chunks[p]], dtype=torch.long, device=self.device)
        with self.precision.autocast():
            z = self.text_encoder(ids, skip_last_layers=self.config.text.skip_last_layers + clip_skip - 1).float()
        encoded, i = {}, 0
        for p in order:
            encoded[p] = z[i:i + len(chunks[p])]
            i += len(chunks[p])

        outs = []
        for g in groups:
            n_chunks = max(len(chunks[p]) for p in g)
            rows = []
            for p in g:
                pad = n_chunks - len(chunks[p])
                zp = torch.cat([encoded[p]] + ([encoded[""]] * pad if pad else []))  # [n_chunks, 77, C]
                w = torch.tensor([c.weights for c in chunks[p] + chunks.get("", [])[:1] * pad],
                                 dtype=torch.float32, device=self.device)
                rows.append(apply_weights(zp.reshape(1, -1, zp.shape[-1]), w.reshape(1, -1)))
            outs.append(torch.cat(rows))
        return outs

    # -- the reverse process -------------------------------------------------------------------

    def _model_fn(self, cond: torch.Tensor, uncond: torch.Tensor | None,
                  guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``f(x_in, t) -> raw UNet output`` with classifier-free guidance folded in (Ho & Salimans 2022):
        ``out = out_uncond + s · (out_cond − out_uncond)``; cond and uncond run as one batch when they
        have the same length. ``f.with_uncond(x_in, t)`` gives ``(out, out_uncond)`` from the same call."""
        unet, dtype, graphs = self.unet, self.precision.weight_dtype, self._unet_graphs
        if getattr(unet, "token_merging_ratio", 0.0):
            graphs = None  # eager: a captured graph holds the UNet without merging (merging is untried in graphs)
        if graphs is not None:  # pipe.unet or pipe.precision may have been replaced since the capture
            graphs.follow(unet, self.precision)

        copy_out = self._compiled_graphs

        def run(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            x, t, ctx = x.to(dtype), t.to(x.device), ctx.to(dtype)
            if graphs is not None:
                return graphs(x, t, ctx).float()
            with self.precision.autocast():
                out = unet(x, t, ctx)
            # A UNet compiled with CUDA graphs returns the graph's own buffer, which its next call
            # overwrites, and some samplers keep outputs across steps: they get a copy (``.float()``
            # copies anything that is not fp32 already; the copy of a latent costs next to nothing).
            return out.clone() if copy_out and out.dtype == torch.float32 else out.float()

        def outputs(x: torch.Tensor, t: torch.Tensor, need_uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            if uncond is None or (guidance_scale == 1.0 and not need_uncond):
                return run(x, t, cond), None
            if uncond.shape[1] == cond.shape[1]:
                out_u, out_c = run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            else:
                out_u, out_c = run(x, t, uncond), run(x, t, cond)
            return out_u + guidance_scale * (out_c - out_u), out_u

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return outputs(x, t, need_uncond=False)[0]

        def with_uncond(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(guided, unconditional) outputs of the same call: for CFG++ (Denoiser.eps_and_uncond_eps)."""
            out, out_u = outputs(x, t, need_uncond=True)
            if out_u is None:
                raise ArgumentError("a CFG++ sampler needs the negative prompt's prediction too; this run has none")
            return out, out_u

        f.with_uncond = with_uncond  # type: ignore[attr-defined]
        return f

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
               steps: int, guidance_scale: float, sampler: str, schedule: str | None, eta: float | None,
               generators: Sequence[torch.Generator] | None = None, init: torch.Tensor | None = None,
               strength: float = 1.0,
               callback: StepCallback | None = None, progress: bool = False,
               step_hook: Callable[[int, float, torch.Tensor, torch.Tensor], Any] | None = None,
               sampler_settings: Mapping[str, Any] | None = None, token_merging_ratio: float = 0.0) -> torch.Tensor:
        """THE sampling loop shared by txt2img and img2img: noise (unit variance) → latent.

        ``generators``: one CPU generator per image for the samplers' own noise (ancestral/SDE steps),
        as :func:`random_streams` returns them; None uses torch's global RNG. ``sampler_settings``,
        ``token_merging_ratio``: see :meth:`txt2img` (the UNet's ratio is set for this loop only)."""
        from .schedulers import Denoiser, get_sampler

        spec = get_sampler(sampler)
        scale = spec.model_guidance_scale(guidance_scale)  # CFG++ divides it as A1111 does
        levels = spec.levels(self.schedule, steps, schedule, strength=strength, settings=sampler_settings)
        bar = ProgressBar(spec.step_count(levels), "sampling", enabled=progress)
        stopped_at: list[torch.Tensor] = []

        def on_step(i: int, level: Any, x: torch.Tensor, denoised: torch.Tensor) -> Any:
            bar.update(1)
            t = float(self.schedule.sigma_to_t(torch.as_tensor(level)).item()) if spec.family == "k" else float(level)
            if step_hook is not None:
                step_hook(i, t, x, denoised)
            if callback is not None and callback(i, t, x) is False:
                stopped_at.append(denoised)
                return False
            return None

        with self._token_merging(token_merging_ratio), bar:
            denoiser = Denoiser(self._model_fn(cond, uncond, scale), self.schedule, self.config.prediction)
            out = spec.sample(denoiser, noise.to(self.device, torch.float32), levels,
                              init=None if init is None else init.to(self.device, torch.float32),
                              generator=None if generators is None else list(generators), callback=on_step,
                              eta=eta, settings=sampler_settings)
        # Stopped early, x still holds the noise of its level; the model's estimate of the clean
        # latent at that step is the usable picture (what the A1111 web UI returns on Interrupt).
        return stopped_at[0] if stopped_at else out

    def _token_merging(self, ratio: float) -> contextlib.AbstractContextManager:
        """The UNet's token merging ratio set to ``ratio`` for a ``with`` block, then restored
        (:meth:`~sdlite.unet.UNetModel.token_merging`). A stand-in UNet without that setting (a plain
        function, in tests) runs as long as ``ratio`` is 0."""
        if not (ratio or getattr(self.unet, "token_merging_ratio", 0.0)):
            return contextlib.nullcontext()
        return self.unet.token_merging(ratio)  # the ratio is checked there

    # -- latents ↔ images ----------------------------------------------------------------------

    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Unit-variance noise ``[B, 4, H/f, W/f]`` (``f = vae_factor``: 8 for SD, 4 for the bundled
        model): image i from a CPU generator seeded with ``seeds[i]``, as the A1111 web UI does with
        its CPU RNG, so a seed gives the same picture on every device."""
        return random_streams(seeds, self._latent_shape(height, width))[0]

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent_channels, height // self.vae_factor, width // self.vae_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """``vae.decode(latent / scale_factor)`` → float images in [0, 1], ``[B, 3, H, W]``.

        Latents more than twice ``tile`` (latent pixels; default :attr:`vae_tile`) on a side are
        decoded in overlapping ``tile``-sized pieces (:meth:`_decode_tiled`), so a 2048×2048 decode
        needs the memory of one tile rather than of the whole image. ``tile=0`` never tiles.

        In half precision the SD VAE can overflow to NaN/inf; then the decode is retried in fp32
        with a warning. NaN that survives is an error, never a silent black image."""
        tile = self.vae_tile if tile is None else int(tile)
        if self.device.type == "cpu":
            # The UNet's activations were freed into the C heap, which keeps the pages; the decode's
            # full-resolution maps are fresh mappings (above malloc's mmap threshold) that would add
            # to them. Trimmed first, a 512x512 fp32 decode after SD1.5's sampling peaked ~200 MiB
            # lower (5300 against 5500 MiB; 39 ms; session 28).
            ops.release_free_memory()
        z = latents / self.scale_factor
        dtype = next(self.vae.parameters()).dtype
        with self._vae_autocast():
            x = self._decode_tiled(z.to(self.device, dtype), tile).float()
        if not torch.isfinite(x).all() and (dtype != torch.float32 or self.precision.autocast_dtype is not None):
            warnings.warn("the VAE decode gave NaN/inf in half precision; retrying in fp32", RuntimeWarning, stacklevel=2)
            self.vae.float()
            try:
                x = self._decode_tiled(z.to(self.device, torch.float32), tile).float()
            finally:
                ops.pack(self.vae.to(dtype))  # .float() unpacked it
        if not torch.isfinite(x).all():
            raise GenerationError("the decoded image contains NaN/inf even in fp32; the latent is broken "
                                  "(check the checkpoint, the guidance scale and the sampler)")
        return ((x + 1) / 2).clamp(0, 1)

    def _vae_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the VAE only when its weights are fp32 (the "autocast" precision); none when
        they are half, also under that precision (a VAE put in half precision on its own).

        With half-precision VAE weights autocast changes no convolution, but it runs every GroupNorm
        and what follows it up to the next conv in fp32, at full image resolution: on an H100 an fp16
        512x512 decode took 26.9 ms under autocast and 22.5 ms without (0.84x; diffusers, which runs
        fp16 without autocast: 23.5 ms), with the same results to rounding (benchmarks/RESULTS-cuda.md,
        "Levers"). The group_norm kernels accumulate their statistics in fp32 for half inputs either way."""
        if next(self.vae.parameters()).dtype != torch.float32:
            return contextlib.nullcontext()
        return self.precision.autocast()

    @property
    def vae_tile(self) -> int:
        """Side of a VAE decode tile in latent pixels (default: the native latent side, 64 for SD1).

        Latents up to twice this side decode in one piece (so with the default, images up to twice
        the native size, e.g. 1024×1024 for SD1, are never tiled); larger ones in tiles. Smaller
        tiles need less memory and, because the VAE's attention is quadratic in the tile's area,
        less time too, at the cost of more tile borders to blend."""
        if self._vae_tile is None:
            return self.config.image_size // self.vae_factor
        return self._vae_tile

    @vae_tile.setter
    def vae_tile(self, value: int | None) -> None:
        if value is not None and int(value) != 0 and int(value) < 8:
            raise ArgumentError(f"vae_tile must be 0 (never tile), None (default) or ≥ 8 latent pixels, got {value}")
        self._vae_tile = None if value is None else int(value)

    @property
    def attention_chunk(self) -> int | None:
        """Queries per attention call in the UNet and the VAE (None: all at once). See :mod:`sdlite.ops`."""
        return self._attention_chunk

    @attention_chunk.setter
    def attention_chunk(self, value: int | None) -> None:
        if value is not None and int(value) < 1:
            raise ArgumentError(f"attention_chunk must be None or ≥ 1, got {value}")
        self._attention_chunk = None if value is None else int(value)
        self._set_on_modules("query_chunk", self._attention_chunk)

    def _set_on_modules(self, name: str, value: Any) -> None:
        """Set the switch ``name`` on every UNet and VAE module that has it (attention, Upsample)."""
        for m in (*self.unet.modules(), *self.vae.modules()):
            if hasattr(m, name):
                setattr(m, name, value)
        if self._unet_graphs is not None:  # a captured graph would keep the old behaviour
            self._unet_graphs.reset()

    def set_low_memory(self, enabled: bool = True, attention_chunk: int = 1024) -> None:
        """The low-memory option: attention ``attention_chunk`` queries at a time, VAE tiles of half
        the native latent side (so anything larger than the native size is decoded in tiles), no
        cached Upsample kernels (on the CPU, where the Upsample runs as four 2x2 convs: ~225 MiB for
        an fp32 SD1 UNet) and no CUDA graphs (each holds a UNet call's activations).
        ``enabled=False`` restores the defaults, except the CUDA graphs: :meth:`set_cuda_graphs`."""
        self.attention_chunk = attention_chunk if enabled else None
        self.vae_tile = max(8, self.config.image_size // self.vae_factor // 2) if enabled else None
        self._set_on_modules("cache_kernels", not enabled)
        if enabled:  # a graph holds its activations' memory between steps
            self.set_cuda_graphs(False)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the UNet runs as replayed CUDA graphs (see :mod:`sdlite.cuda_graphs`)."""
        return self._unet_graphs is not None

    def set_cuda_graphs(self, enabled: bool = True) -> None:
        """Run the UNet as CUDA graphs: captured at the first step of each new shape, then replayed,
        one launch per step. On by default on CUDA (:func:`load`); needs a CUDA device. Costs the
        memory of one UNet call's activations per kept shape. Measured in benchmarks/RESULTS-cuda.md."""
        if not enabled:
            self._unet_graphs = None
            return
        if self.device.type != "cuda":
            raise ArgumentError(f"CUDA graphs need a CUDA device; this pipeline is on {self.device}")
        if self._unet_graphs is None:
            from .cuda_graphs import GraphedCall

            self._unet_graphs = GraphedCall(self.unet, self.precision)

    def compile(self, **options: Any) -> None:
        """``torch.compile`` the UNet in place (``nn.Module.compile``: same module, same state-dict
        names, so :func:`sdlite.save` still works). The first call at each new shape compiles
        (minutes on a CPU, about a minute on a GPU); ``options`` go to ``torch.compile``. Replaces
        the CUDA graphs (compile's own ``mode="reduce-overhead"`` uses them: 0.73x the time of a
        512² generation on an H100). Measured in benchmarks/RESULTS-compile.md and RESULTS-cuda.md."""
        self.set_cuda_graphs(False)
        ops.unpack(self.unet)  # the compiler traces plain weights
        self.unet.compile(**options)
        # On CUDA compile may replay CUDA graphs ("reduce-overhead", "max-autotune", or through
        # ``options``); the sampling loop then copies each output (see :meth:`_model_fn`).
        self._compiled_graphs = self.device.type == "cuda"

    def _decode_tiled(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """Decode ``z`` in overlapping ``tile``×``tile`` pieces and blend them.

        Neighbouring tiles overlap by a quarter tile. In the overlap each pixel is a weighted mean
        of the tiles covering it, with weights that ramp linearly from 0 at a tile's inner edge to
        1; image borders are not ramped. Each tile sees less context than the whole image, so the
        blend hides the small differences where tiles meet. Only one tile's activations are alive
        at a time.
        """
        _, _, h, w = z.shape
        if tile <= 0 or (h <= 2 * tile and w <= 2 * tile):
            return self.vae.decode(z)
        from .ops import shared_statistics

        overlap = tile // 4
        stride = tile - overlap
        with shared_statistics(self.vae.decoder) as set_mode:
            # Every tile is normalised with statistics of the whole image, measured on a tile-sized
            # copy of the latent (see sdlite.ops.GroupNorm). An approximation: on the bundled model
            # nearest-neighbour downscaling gave closer statistics than area or bilinear.
            set_mode("record")
            self.vae.decode(F.interpolate(z, size=(min(h, tile), min(w, tile)), mode="nearest"))
            set_mode("reuse")
            return self._blend_tiles(z, tile, overlap, stride)

    def _blend_tiles(self, z: torch.Tensor, tile: int, overlap: int, stride: int) -> torch.Tensor:
        b, _, h, w = z.shape
        f = self.vae_factor

        def starts(n: int) -> list[int]:
            if n <= tile:
                return [0]
            s = list(range(0, n - tile, stride)) + [n - tile]
            return s

        out = weight = None
        for y in starts(h):
            for x in starts(w):
                piece = self.vae.decode(z[:, :, y:y + tile, x:x + tile]).float()
                th, tw = piece.shape[-2:]
                ramp_y = _ramp(th, overlap * f, top=y > 0, bottom=y + tile < h, device=piece.device)
                ramp_x = _ramp(tw, overlap * f, top=x > 0, bottom=x + tile < w, device=piece.device)
                wgt = ramp_y[:, None] * ramp_x[None, :]
                if out is None:
                    out = torch.zeros(b, piece.shape[1], h * f, w * f, device=piece.device)
                    weight = torch.zeros(h * f, w * f, device=piece.device)
                out[:, :, y * f:y * f + th, x * f:x * f + tw] += piece * wgt
                weight[y * f:y * f + th, x * f:x * f + tw] += wgt
        return out / weight

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` → scaled latents (the posterior mean × ``scale_factor``)."""
        dtype = next(self.vae.parameters()).dtype
        with self._vae_autocast():
            posterior = self.vae.encode((images * 2 - 1).to(self.device, dtype))
        return posterior.mean.float() * self.scale_factor

    def resize_latent(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A latent ``[B, C, h, w]`` resized to the latent of a ``height``×``width`` image, as A1111's resize
        mode 3 ("Just resize (latent upscale)") does it: ``F.interpolate`` bilinear, with torch's defaults
        ``align_corners=False`` and no antialiasing (a size that already matches is returned unchanged).

        >>> pipe.resize_latent(pipe.encode_image(pixels), 512, 768).shape[-2:]  # doctest: +SKIP
        torch.Size([64, 96])
        """
        return F.interpolate(latent, size=(height // self.vae_factor, width // self.vae_factor), mode="bilinear")

    # -- the public generation API -------------------------------------------------------------

    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", steps: int = 20,
                guidance_scale: float = 7.5, width: int | None = None, height: int | None = None,
                seed: int | None = None, sampler: str = "euler_a", schedule: str | None = None,
                batch_size: int = 1, eta: float | None = None, latents: torch.Tensor | None = None,
                callback: StepCallback | None = None, output_type: str = "pil", progress: bool = False,
                clip_skip: int = 1, sampler_settings: Mapping[str, Any] | None = None,
                token_merging_ratio: float = 0.0, variation_seed: int | None = None,
                variation_strength: float = 0.0, seed_resize_from: tuple[int, int] | None = None,
                eta_noise_seed_delta: int = 0) -> Any:
        """Generate images from text.

        ``seed=None`` or ``-1`` picks a random seed; image i of the batch uses ``seed + i`` (with a variation
        strength, see below: ``seed`` itself).
        ``latents`` replaces the seeded starting noise (unit variance, ``[B, 4, H/f, W/f]``, ``f = vae_factor``).
        ``callback(step, t, latents)`` runs after each step; returning ``False`` stops early, and the
        result is then the model's estimate of the clean image at that step (the infotext keeps the
        requested ``steps``, as A1111's does after Interrupt). ``eta``: the noise scale of the
        ancestral/SDE samplers (default 1) and DDIM (default 0); ``clip_skip``: 1 = the text encoder's
        last layer, 2 = the one before ("Clip skip 2"), ...
        ``sampler_settings``: A1111's sampler settings by their names (:data:`sdlite.schedulers.SAMPLER_SETTINGS`),
        e.g. ``{"uni_pc_order": 2, "beta_dist_alpha": 0.5}``; each applies only to its sampler or schedule.
        ``token_merging_ratio``: token merging (ToMe, :mod:`sdlite.unet.tome`), the share of the top level's
        tokens merged before its self-attention, 0 (off) to 0.75: faster, less detailed (A1111's setting;
        recorded in the infotext when on).
        ``output_type``: ``"pil"`` (an :class:`Images` list), ``"np"`` (float array [B,H,W,3] in [0,1])
        or ``"latent"`` (the scaled latent tensor).

        A1111's seed tools (:mod:`sdlite.seeds`): ``variation_strength`` other than 0 moves the starting
        noise from the seed's towards ``variation_seed``'s (0.05–0.2: the same picture, other details;
        1: the variation seed's starting noise); every image of the batch then keeps ``seed`` and image i uses
        ``variation_seed + i`` (None or -1: random). ``seed_resize_from=(width, height)``: the size at
        which the seed was found; its noise is drawn at that size and centred in this one's, so the
        picture's composition mostly survives a new aspect ratio. Both are written in the infotext.
        ``eta_noise_seed_delta``: A1111's setting of that name ("ENSD" in the infotext; 31337 in many shared
        infotexts): the ancestral samplers (Euler a, DPM2 a, DPM++ 2S a, DPM fast, DPM adaptive; eta ≠ 0)
        draw their noise from a stream seeded with seed + ENSD; other samplers ignore it, and A1111 records
        it for those five only.

        >>> images = pipe.txt2img("a blue square at the top", seed=42, steps=20)  # doctest: +SKIP
        >>> pipe.txt2img("a blue square", seed=42, variation_seed=7, variation_strength=0.1)  # doctest: +SKIP
        """
        return self._generate(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, width=width,
                              height=height, seed=seed, sampler=sampler, schedule=schedule, batch_size=batch_size,
                              eta=eta, latents=latents, callback=callback, output_type=output_type,
                              progress=progress, clip_skip=clip_skip, sampler_settings=sampler_settings,
                              token_merging_ratio=token_merging_ratio, variation_seed=variation_seed,
                              variation_strength=variation_strength, seed_resize_from=seed_resize_from,
                              eta_noise_seed_delta=eta_noise_seed_delta)

    def img2img(self, image: Image.Image | str | Path | torch.Tensor, prompt: str | Sequence[str],
                strength: float = 0.75, negative_prompt: str | Sequence[str] = "", steps: int = 20,
                guidance_scale: float = 7.5, width: int | None = None, height: int | None = None,
                seed: int | None = None, sampler: str = "euler_a", schedule: str | None = None,
                batch_size: int = 1, eta: float | None = None, latents: torch.Tensor | None = None,
                callback: StepCallback | None = None, output_type: str = "pil", progress: bool = False,
                clip_skip: int = 1, resize_mode: int | str = 0,
                sampler_settings: Mapping[str, Any] | None = None, token_merging_ratio: float = 0.0,
                variation_seed: int | None = None, variation_strength: float = 0.0,
                seed_resize_from: tuple[int, int] | None = None,
                eta_noise_seed_delta: int = 0) -> Any:
        """Redraw ``image`` under ``prompt``: encode it, noise it to ``strength`` of the way, denoise.

        ``strength`` in (0, 1]: 1 ignores the image, small values keep it. As in A1111, with
        ``t_enc = int(strength·steps)`` the k-samplers run the last ``t_enc + 1`` steps of the
        ``steps``-step schedule, DDIM/PLMS the last ``t_enc``. Width/height default to the image's size
        rounded down to a multiple of 8.

        ``resize_mode``: how an image of another size becomes width×height, A1111's modes (the number,
        sdlite's name or A1111's label; see :mod:`sdlite.resize`): 0 ``"just_resize"`` stretches it,
        1 ``"crop"`` scales it to cover and keeps the centre, 2 ``"fill"`` scales it to fit and fills the
        bands with its stretched edges, 3 ``"latent"`` encodes it at its own size and resizes the latent
        (bilinear). The infotext does not record it (A1111's does not either). The other arguments are
        :meth:`txt2img`'s.

        >>> pipe.img2img("photo.png", "a watercolour", width=512, height=512, resize_mode="crop")  # doctest: +SKIP
        """
        from .resize import LATENT, parse_resize_mode, resize_image

        strength = _number("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise ArgumentError(f"strength must be in (0, 1], got {strength}")
        mode = parse_resize_mode(resize_mode)
        pil = _open_image(image)
        width = width or (pil.width // 8) * 8
        height = height or (pil.height // 8) * 8
        _check_size(width, height, self.vae_factor)
        if mode != LATENT:
            pil = resize_image(pil, width, height, mode)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return self._generate(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, width=width,
                              height=height, seed=seed, sampler=sampler, schedule=schedule, batch_size=batch_size,
                              eta=eta, latents=latents, callback=callback, output_type=output_type,
                              progress=progress, clip_skip=clip_skip, init_pixels=pixels, strength=strength,
                              init_latent_resize=mode == LATENT, sampler_settings=sampler_settings,
                              token_merging_ratio=token_merging_ratio, variation_seed=variation_seed,
                              variation_strength=variation_strength, seed_resize_from=seed_resize_from,
                              eta_noise_seed_delta=eta_noise_seed_delta)

    def _seed_tools(self, n: int, seed: Any, variation_seed: Any, variation_strength: Any, seed_resize_from: Any,
                    eta_noise_seed_delta: Any, spec: Any, eta_used: float) -> tuple:
        """The seeds of the ``n`` images and A1111's seed tools (:mod:`sdlite.seeds`), checked:
        ``(seeds, variation_seeds or None, variation_strength, seed_shape or None, seed_resize_from or None,
        ensd)``, where ENSD is 0 unless this sampler uses it with ``eta_used`` (the run's eta, as
        :meth:`Sampler.check_eta` gives it) other than 0, as A1111 records it."""
        seed = -1 if seed is None else _integer("seed", seed)
        if seed == -1:
            seed = random.randrange(2**32)
            log.info("seed: %d", seed)
        variation_strength = _number("variation_strength", variation_strength)
        if not math.isfinite(variation_strength):
            raise ArgumentError(f"variation_strength must be a finite number (0 = off, 1 = the variation seed's "
                                f"noise), got {variation_strength}")
        variation_seeds = None
        if variation_strength:  # as A1111: the batch keeps the seed, the variation seed counts up
            variation_seed = -1 if variation_seed is None else _integer("variation_seed", variation_seed)
            if variation_seed == -1:
                variation_seed = random.randrange(2**32)
            check_seed(variation_seed, n, "variation_seed")
            check_seed(seed, 1)
            seeds = [seed] * n
            variation_seeds = [variation_seed + i for i in range(n)]
        else:
            check_seed(seed, n)
            seeds = [seed + i for i in range(n)]
        seed_shape = None
        if seed_resize_from is not None:
            if isinstance(seed_resize_from, str) or len(seed_resize_from) != 2:
                raise ArgumentError(f"seed_resize_from must be (width, height) in pixels, got {seed_resize_from!r}")
            rw, rh = (_integer("seed_resize_from", v) for v in seed_resize_from)
            if rw < self.vae_factor or rh < self.vae_factor:
                raise ArgumentError(f"seed_resize_from must be (width, height) in pixels, each ≥ {self.vae_factor}, "
                                    f"got {tuple(seed_resize_from)}")
            seed_resize_from = (rw, rh)
            seed_shape = self._latent_shape(rh, rw)
        ensd = _integer("eta_noise_seed_delta", eta_noise_seed_delta)
        if not (spec.uses_ensd and eta_used != 0):
            ensd = 0  # as A1111 records it: only the ancestral samplers with noise to add
        if ensd:
            check_seed(seeds[0] + ensd, n, "seed + eta_noise_seed_delta")
        return seeds, variation_seeds, variation_strength, seed_shape, seed_resize_from, ensd

    def _generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str], *, steps: int,
                  guidance_scale: float, width: int | None, height: int | None, seed: int | None, sampler: str,
                  schedule: str | None, batch_size: int, eta: float | None, latents: torch.Tensor | None,
                  callback: StepCallback | None, output_type: str, progress: bool, clip_skip: int,
                  init_pixels: torch.Tensor | None = None, strength: float = 1.0,
                  init_latent_resize: bool = False, step_hook: Callable | None = None,
                  sampler_settings: Mapping[str, Any] | None = None, token_merging_ratio: float = 0.0,
                  variation_seed: int | None = None, variation_strength: float = 0.0,
                  seed_resize_from: tuple[int, int] | None = None,
                  eta_noise_seed_delta: int = 0) -> Any:
        from .infotext import format_infotext, generation_params
        from .schedulers import check_sampler_settings, parse_sampler_and_schedule

        if self.config.in_channels != self.latent_channels:
            raise ArgumentError(f"this model's UNet takes {self.config.in_channels} input channels (an inpainting, "
                                "depth or InstructPix2Pix model); sdlite loads it but generates only with "
                                "text-to-image models (4 channels)")
        width = self.config.image_size if width is None else _integer("width", width)
        height = self.config.image_size if height is None else _integer("height", height)
        _check_size(width, height, self.vae_factor)
        steps, batch_size, clip_skip = (_integer(k, v) for k, v in
                                        (("steps", steps), ("batch_size", batch_size), ("clip_skip", clip_skip)))
        if steps < 1:
            raise ArgumentError(f"steps must be ≥ 1, got {steps}")
        guidance_scale = _number("guidance_scale", guidance_scale)
        if not math.isfinite(guidance_scale):
            raise ArgumentError(f"guidance_scale must be a finite number (7.5 is usual; 1 = no guidance), "
                                f"got {guidance_scale}")
        if output_type not in ("pil", "np", "latent"):
            raise ArgumentError(f"output_type must be 'pil', 'np' or 'latent', not {output_type!r}")
        if callback is not None and not callable(callback):
            raise ArgumentError(f"callback must be a function callback(step, t, latents) or None, got {callback!r}")
        if sampler_settings is not None and not isinstance(sampler_settings, Mapping):
            raise ArgumentError(f"sampler_settings must be a dict of A1111's setting names to values, such as "
                                f"{{'uni_pc_order': 2}}; got {sampler_settings!r}")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ArgumentError(f"latents must be a torch.Tensor or None, got {type(latents).__name__}")
        spec, schedule_id = parse_sampler_and_schedule(sampler, schedule)
        settings = check_sampler_settings(sampler_settings)
        if batch_size < 1:
            raise ArgumentError(f"batch_size must be ≥ 1, got {batch_size}")
        prompts = _texts("prompt", prompt)
        if isinstance(prompt, str):
            prompts *= batch_size
        elif batch_size not in (1, len(prompts)):
            raise ArgumentError(f"batch_size={batch_size} but {len(prompts)} prompts were given: a list of prompts "
                                "makes one image per prompt (leave batch_size at 1)")
        if not prompts:
            raise ArgumentError("give at least one prompt")
        negatives = _texts("negative_prompt", "" if negative_prompt is None else negative_prompt)
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives *= len(prompts)
        if len(negatives) != len(prompts):
            raise ArgumentError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        eta_used = spec.check_eta(eta)  # (None: the sampler's default)
        token_merging_ratio = tome.check_ratio(token_merging_ratio)
        if not 1 <= clip_skip <= self.max_clip_skip:
            raise ArgumentError(f"clip_skip must be in [1, {self.max_clip_skip}] for this model's text encoder "
                                f"(1 = its last layer), got {clip_skip}")
        n = len(prompts)
        seeds, variation_seeds, variation_strength, seed_shape, seed_resize_from, ensd = self._seed_tools(
            n, seed, variation_seed, variation_strength, seed_resize_from, eta_noise_seed_delta, spec, eta_used)
        shape = (n, *self._latent_shape(height, width))
        if latents is not None and (tuple(latents.shape[-3:]) != shape[1:] or latents.numel() != math.prod(shape)):
            raise ArgumentError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")

        if guidance_scale != 1.0 or spec.cfg_pp:  # CFG++ uses the negative prompt's prediction at any scale
            cond, uncond = self.encode_prompts([prompts, negatives], clip_skip)
        else:
            cond, uncond = self.encode_prompt(prompts, clip_skip), None
        noise, generators = random_streams(seeds, shape[1:], variation_seeds=variation_seeds,
                                           variation_strength=variation_strength, seed_shape=seed_shape,
                                           noise_seed_delta=ensd)
        if latents is not None:  # replaces the starting noise; the streams still drive the sampler's noise
            noise = latents.float().reshape(shape)
        init = None
        if init_pixels is not None:
            init = self.encode_image(init_pixels)
            if init_latent_resize:  # resize mode 3: the image was encoded at its own size
                init = self.resize_latent(init, height, width)
            init = init.expand(len(prompts), -1, -1, -1)

        out = self.sample(noise, cond, uncond, steps=steps, guidance_scale=guidance_scale,
                          sampler=spec.id, schedule=schedule_id, eta=eta, generators=generators, init=init,
                          strength=strength, callback=callback, progress=progress, step_hook=step_hook,
                          sampler_settings=settings, token_merging_ratio=token_merging_ratio)
        if output_type == "latent":
            return out
        images = self.decode_latents(out).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return images
        result = Images()
        result.seeds, result.variation_seeds, result.infotexts = seeds, variation_seeds, []
        label = _schedule_label(schedule_id, spec)
        for i, arr in enumerate(images):
            params = generation_params(
                steps=steps, sampler=spec.label, schedule=label,
                cfg_scale=guidance_scale, seed=seeds[i], width=width, height=height,
                model_hash=self.model_hash, model_name=self.name,
                variation_seed=None if variation_seeds is None else variation_seeds[i],
                variation_strength=variation_strength or None, seed_resize_from=seed_resize_from,
                denoising_strength=strength if init is not None else None,
                eta=eta if (eta is not None and spec.uses_eta and float(eta) != spec.default_eta) else None,
                eta_key=spec.eta_key, rng="CPU",  # each image's noise drawn as A1111's "CPU" source does
                clip_skip=clip_skip if clip_skip > 1 else None, ensd=ensd or None, token_merging_ratio=token_merging_ratio or None,
                extra=_schedule_extra(label, settings),
                version=VERSION,
            )
            text = format_infotext(prompts[i], negatives[i], params)
            img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
            img.info["parameters"] = text
            result.append(img)
            result.infotexts.append(text)
        return result


def _schedule_label(schedule_id: str | None, spec: Any) -> str | None:
    """A1111 writes ``Schedule type`` with the schedule actually used: the sampler's default when the
    user chose "Automatic" (DPM++ 2M → Karras), nothing when that default is the model's own."""
    from .schedulers import schedule_label

    if spec.family == "timestep":
        return None
    effective = spec.default_schedule if schedule_id in (None, "automatic") else schedule_id
    return None if effective == "automatic" else schedule_label(effective)


def _schedule_extra(label: str | None, settings: Mapping[str, Any]) -> dict[str, float] | None:
    """The schedule's own infotext keys: A1111 records the Beta schedule's shape parameters (its settings
    beta_dist_alpha / beta_dist_beta) whenever that schedule ran."""
    from .schedulers.schedule import BETA_DIST_ALPHA, BETA_DIST_BETA

    if label != "Beta":
        return None
    return {"Beta schedule alpha": settings.get("beta_dist_alpha", BETA_DIST_ALPHA),
            "Beta schedule beta": settings.get("beta_dist_beta", BETA_DIST_BETA)}


def _ramp(n: int, width: int, *, top: bool, bottom: bool, device: torch.device) -> torch.Tensor:
    """Blend weights along one side of a tile: linear from ~0 to 1 over ``width`` pixels at each end
    that borders another tile (``top``/``bottom``), 1 elsewhere. Never exactly 0, so every pixel is
    covered with a positive total weight."""
    r = torch.ones(n, device=device)
    ramp = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    if top:
        r[:width] = torch.minimum(r[:width], ramp)
    if bottom:
        r[n - width:] = torch.minimum(r[n - width:], ramp.flip(0))
    return r


def _integer(name: str, value: Any) -> int:
    """``value`` as an int, or an :class:`ArgumentError` naming the argument: whole numbers pass as ints,
    floats (2.0), one-element tensors and digit strings (what :func:`sdlite.infotext.parse_infotext`
    gives); a fraction is refused rather than cut (seed 3.7 is not seed 3), and so is a bool."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ArgumentError(f"{name} must be a whole number, got {value!r}")


def _number(name: str, value: Any) -> float:
    """``value`` as a float (numbers, one-element tensors, numeric strings), or an :class:`ArgumentError`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (bool, np.bool_)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ArgumentError(f"{name} must be a number, got {value!r}")


def _texts(name: str, value: Any) -> list[str]:
    """A prompt or a list of prompts as a list of str, or an :class:`ArgumentError` naming the argument."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
        return list(texts)
    raise ArgumentError(f"{name} must be a string or a list of strings, got {value!r}")


def _check_size(width: int, height: int, factor: int) -> None:
    if width <= 0 or height <= 0 or width % 8 or height % 8 or width % factor or height % factor:
        raise ArgumentError(f"width and height must be positive multiples of 8, got {width}x{height}")


def _open_image(image: Image.Image | str | Path | np.ndarray | torch.Tensor) -> Image.Image:
    """The init image as 8-bit RGB, at least 8x8 px: a PIL image, a path, a numpy array ``[H, W]`` or
    ``[H, W, 3|4]`` (uint8, uint16, or float in [0, 1]), or a tensor ``[(1,) 3, H, W]`` in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if not (image.ndim == 3 or (image.ndim == 4 and image.shape[0] == 1)) or image.shape[-3] != 3:
            raise ArgumentError(f"an init image tensor must be [3, H, W] or [1, 3, H, W] (channels first) in "
                                f"[0, 1]; got {list(image.shape)}")
        image = image.detach().float().cpu().reshape(image.shape[-3:]).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f":
            # Clipped only for rounding: pixels in 0..255 or in [-1, 1] (diffusers' convention) would
            # otherwise turn white or lose their darker half without a word.
            lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
            if not (lo >= -1e-3 and hi <= 1 + 1e-3):
                raise ArgumentError(f"a float init image must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                                    "divide 0..255 pixels by 255, map [-1, 1] ones with (x + 1) / 2")
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        elif image.dtype == np.uint16:  # 16 bits a channel, as _to_rgb8 scales a 16-bit image file
            image = (image / 257.0).round().astype(np.uint8)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ArgumentError(f"an init image array must be [H, W] or [H, W, 3|4], uint8, uint16 or float in "
                                f"[0, 1]; got {list(image.shape)} {image.dtype}")
        image = Image.fromarray(image)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ArgumentError(f"init image {path} does not exist" if not path.exists()
                                else f"init image {path} is not a file")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except Exception as e:
            raise ArgumentError(f"cannot read init image {path}: {e}") from None
    elif not isinstance(image, Image.Image):
        raise ArgumentError("the init image must be a PIL image, a file path, a numpy array or a tensor, "
                            f"not {type(image).__name__}")
    if image.width < 8 or image.height < 8:
        raise ArgumentError(f"the init image is {image.width}x{image.height} px; it must be at least 8x8")
    return _to_rgb8(image)


def _to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own ``convert("RGB")`` clips 16-bit and float pixels to 0..255 (a 16-bit
    greyscale PNG turns white), and drops alpha (a transparent background turns black): here
    high-bit-depth values are scaled down, and transparency is flattened onto white, as A1111 does."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 65535 -> 255
        elif image.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


# -- loading and saving --------------------------------------------------------------------------

def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, prediction: str | None = None, use_ema: bool = False,
         config: ModelConfig | None = None, low_memory: bool = False, compile: bool = False,
         cuda_graphs: bool | None = None) -> Pipeline:
    """Load a Stable Diffusion checkpoint in the original layout (or the bundled model when ``path`` is None).

    - ``device``: ``"cuda"``, ``"cpu"``... (default: CUDA when available);
    - ``dtype``: ``"fp32"``, ``"fp16"``, ``"bf16"``, or ``"autocast"`` (fp32 weights under autocast)
      (default: fp16 on CUDA, fp32 on CPU; see :mod:`sdlite.devices`);
    - ``prediction``: ``"eps"`` or ``"v"``; default from a same-stem ``.yaml`` beside the file, else
      detected (see :func:`sdlite.checkpoint.resolve_prediction`);
    - ``use_ema``: take the ``model_ema.*`` copies of the UNet instead of the plain weights;
    - ``config``: skip the detection of the architecture and use this :class:`ModelConfig`
      (non-standard models). Its ``prediction`` is not used: the prediction type is resolved as above
      (give ``prediction=``), and for SD2 the native size follows it (768 for v, 512 for eps);
    - ``low_memory``: for small GPUs — attention 1024 queries at a time, and images larger than the
      native size decoded in tiles of half the native size (see :meth:`Pipeline.set_low_memory`); a
      little slower; the attention chunking changes nothing but rounding, the tiled decode is an
      approximation (see :meth:`Pipeline._decode_tiled`);
    - ``compile``: ``torch.compile`` the UNet (see :meth:`Pipeline.compile`), with compile's own
      CUDA graphs (``mode="reduce-overhead"``) where ``cuda_graphs`` is on. Off by default: the
      first call at each size then compiles (minutes on a CPU, about a minute on a GPU), which
      short runs never win back.
    - ``cuda_graphs``: replay the UNet as CUDA graphs (see :meth:`Pipeline.set_cuda_graphs`);
      default: on for CUDA unless ``low_memory``.

    >>> pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
    """
    from .checkpoint import load_networks
    from .clip import tokenizer_for

    if path is None:
        if not BUNDLED_MODEL.is_file():
            raise CheckpointError(f"{BUNDLED_MODEL}: the bundled model is missing from this install; "
                                  "pass the path of a checkpoint")
        path = BUNDLED_MODEL
    path = Path(path)
    if prediction not in (None, "eps", "v"):
        raise ArgumentError(f"prediction must be 'eps', 'v' or None (detect it), not {prediction!r}")
    precision = devices.choose(device, dtype)
    # Each layer's CPU weight goes into oneDNN's layout as soon as it is read (sdlite.ops.pack; a
    # no-op on other devices).
    packer = ops.Packer()
    cfg, nets = load_networks(path, device=precision.device, dtype=precision.weight_dtype,
                              prediction=prediction, use_ema=use_ema, config=config, finish=packer)
    packer.close()
    memory_format = devices.unet_memory_format(precision.device)
    if memory_format != torch.contiguous_format:  # (.to() would unpack packed weights)
        nets["unet"].to(memory_format=memory_format)
    pipe = Pipeline(tokenizer_for(cfg.text), nets["text_encoder"], nets["unet"], nets["vae"], cfg, precision,
                    name=path.stem, path=path)
    if low_memory:
        pipe.set_low_memory()
    if cuda_graphs is None:
        cuda_graphs = pipe.device.type == "cuda" and not low_memory
    if cuda_graphs:
        pipe.set_cuda_graphs()
    if compile:
        # Compiled, the UNet replays compile's own CUDA graphs in their place ("reduce-overhead"):
        # its default mode gives them up, and took 1.26-1.43x the time of sdlite's graph replay at
        # batch 2, against 0.73x for a whole generation in "reduce-overhead" (RESULTS-cuda.md).
        pipe.compile(**({"mode": "reduce-overhead"} if cuda_graphs else {}))
    return pipe


def save(pipeline: Pipeline, path: str | Path, dtype: str | torch.dtype | None = None,
         overwrite: bool = False) -> Path:
    """Write ``pipeline`` as a ``.safetensors`` in the original layout, its config in the metadata.

    Load → save → load gives identical tensors. Refuses to overwrite unless ``overwrite=True``.
    """
    from .checkpoint import save_checkpoint

    nets = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    return save_checkpoint(nets, pipeline.config, path, dtype=devices.parse_dtype(dtype), overwrite=overwrite)
