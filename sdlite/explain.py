"""Study mode: pictures of the forward and reverse processes, and the numbers behind them.

Each function draws one figure (PNG, plus a GIF for the reverse process) into ``outdir`` and returns
the numbers it drew, so that a test — or a reader in a notebook — can check them::

    >>> import sdlite
    >>> from sdlite.explain import explain_all
    >>> pipe = sdlite.load()                                  # the bundled model  # doctest: +SKIP
    >>> results = explain_all(pipe, "docs/figures")           # every figure, ~10 s on a CPU  # doctest: +SKIP
    >>> results["schedules"]["snr"][:3]                       # doctest: +SKIP

- :func:`latent_space`: an image, its latent channels (× ``scale_factor``) and the VAE reconstruction;
- :func:`forward_process`: ``q(x_t | x_0)`` (DDPM eq. 4) at t = 0, 100, ..., 900, 999, in latent space
  (each latent decoded by the VAE) and in pixel space, with SNR_t = ᾱ_t / (1 − ᾱ_t);
- :func:`timestep_embedding_figure`: the UNet's sinusoidal timestep embedding for every t;
- :func:`reverse_process`: the x_t a sampler visits and the x0 it predicts at every step (PNG strip + GIF);
- :func:`schedules`: ᾱ_t, SNR and σ_t against t, the Karras sigmas, and the timesteps every sampler visits;
- :func:`guidance`: one seed at several classifier-free guidance scales, and the conditional vs unconditional
  predicted x0 at an early step;
- :func:`explain_all` runs them all; :func:`main` is ``scripts/explain.py``.

Drawing is plain PIL (small hand-made plots, no plotting library). Every function writes only fixed
file names inside ``outdir`` and refuses to write through a link or over something that is not a file,
so nothing outside ``outdir`` is ever overwritten; its own earlier figures are replaced.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ArgumentError, SdliteError

if TYPE_CHECKING:
    from .pipeline import Pipeline

DEFAULT_PROMPT = "a red circle on the left"
DEFAULT_SEED = 1
DEFAULT_STEPS = 20
FORWARD_TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
# The samplers explain_all draws the reverse process of: the sigma-space ODE (Euler), its 2nd-order
# multistep cousin (DPM++ 2M), deterministic DDIM and the DDPM posterior.
REVERSE_SAMPLERS = ("euler", "dpmpp_2m", "ddim", "ddpm")

PathLike = str | Path
ImageLike = str | Path | Image.Image | torch.Tensor | None


# -- file safety ------------------------------------------------------------------------------------

def _output_path(outdir: PathLike, name: str) -> Path:
    """``outdir/name``, creating ``outdir``. Refuses a name that leaves ``outdir``, a link (writing through
    it would overwrite a file elsewhere) and anything that exists but is not a regular file."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ArgumentError(f"--outdir {outdir} exists and is not a folder")
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise ArgumentError(f"refusing to write {path}: figure names must stay inside {outdir}")
    if path.is_symlink():
        raise ArgumentError(f"refusing to write {path}: it is a link (it could point outside {outdir}); remove it")
    if path.exists() and not path.is_file():
        raise ArgumentError(f"refusing to write {path}: it exists and is not a file")
    return path


# -- drawing helpers (PIL only) --------------------------------------------------------------------

_PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34))


@functools.lru_cache(maxsize=None)
def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return box[2] - box[0], box[3] - box[1]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` or ``[1, H, W]`` float in [0, 1] → ``[H, W, 3]`` uint8."""
    x = x.detach().float().cpu().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, *x.shape[1:])
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _tile(x: torch.Tensor, cell: int) -> Image.Image:
    """One image as a ``cell``×``cell`` tile: pixel-exact (nearest) when enlarged, Lanczos when shrunk."""
    im = Image.fromarray(_to_uint8(x))
    scale = cell / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    if im.size == (cell, cell):
        return im
    out = Image.new("RGB", (cell, cell), "white")
    out.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return out


def _grid(rows: Sequence[Sequence[torch.Tensor | None]], *, row_labels: Sequence[str],
          col_labels: Sequence[str] | None = None, cell_labels: Sequence[Sequence[str]] | None = None,
          title: str = "", cell: int = 96) -> Image.Image:
    """Images in rows (``None`` = empty cell), a label left of each row, optional column headers and
    per-cell captions (drawn above each tile)."""
    font, bold = _font(12), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n_cols = max(len(r) for r in rows)
    label_w = max(_text_size(probe, s, font)[0] for s in row_labels) + 14
    header_h = max((_text_size(probe, s, font)[1] for s in col_labels or ()), default=-4) + 8
    # Each row reserves room for its own captions only.
    caption_hs = [max((_text_size(probe, s, font)[1] for s in (cell_labels[i] if cell_labels else ()) if s),
                      default=-6) + 6 for i in range(len(rows))]
    title_h = _text_size(probe, title, bold)[1] + 12 if title else 4
    gap = 4
    row_tops = [title_h + header_h + sum(caption_hs[:i]) + i * (cell + gap) for i in range(len(rows))]
    width = max(label_w + n_cols * (cell + gap) + gap, _text_size(probe, title, bold)[0] + 12)
    height = title_h + header_h + sum(caption_hs) + len(rows) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap + 2, 5), title, fill="black", font=bold)
    for j, label in enumerate(col_labels or ()):
        w, _ = _text_size(draw, label, font)
        draw.multiline_text((label_w + j * (cell + gap) + (cell - w) // 2, title_h), label, fill="black", font=font,
                            spacing=2, align="center")
    for i, row in enumerate(rows):
        y, caption_h = row_tops[i], caption_hs[i]
        _, h = _text_size(draw, row_labels[i], font)
        draw.multiline_text((gap + 2, y + caption_h + (cell - h) // 2), row_labels[i], fill="black", font=font,
                            spacing=2)
        for j, img in enumerate(row):
            x = label_w + j * (cell + gap)
            caption = cell_labels[i][j] if cell_labels and j < len(cell_labels[i]) else ""
            if caption:
                w, _ = _text_size(draw, caption, font)
                draw.multiline_text((x + (cell - w) // 2, y), caption, fill="black", font=font, spacing=2,
                                    align="center")
            if img is not None:
                canvas.paste(_tile(img, cell), (x, y + caption_h))
    return canvas


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi] (either order)."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


class _Axes:
    """A plot box inside a PIL image: maps data to pixels (y linear or log10), draws ticks and a frame."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], logy: bool = False) -> None:
        self.draw, self.box, self.logy = draw, box, logy
        self.x0, self.x1 = xlim
        self.y0, self.y1 = (math.log10(ylim[0]), math.log10(ylim[1])) if logy else ylim

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        yy = math.log10(y) if self.logy else y
        return (left + (x - self.x0) / (self.x1 - self.x0) * (right - left),
                bottom - (yy - self.y0) / (self.y1 - self.y0) * (bottom - top))

    def frame(self, title: str, xlabel: str, ylabel: str, yticks: bool = True, grid: bool = True) -> None:
        d, font = self.draw, _font(11)
        left, top, right, bottom = self.box
        for v in _nice_ticks(self.x0, self.x1):
            x, _ = self.px(v, 10**self.y0 if self.logy else self.y0)
            if grid:
                d.line([(x, top), (x, bottom)], fill=(235, 235, 235))
            d.line([(x, bottom), (x, bottom + 4)], fill="black")
            s = f"{v:g}"
            d.text((x - _text_size(d, s, font)[0] / 2, bottom + 6), s, fill="black", font=font)
        if yticks:
            if self.logy:
                lo, hi = math.ceil(self.y0 - 1e-9), math.floor(self.y1 + 1e-9)
                stride = max(1, math.ceil((hi - lo + 1) / 7))
                values = [10.0**k for k in range(lo, hi + 1, stride)]
                labels = [f"1e{k}" for k in range(lo, hi + 1, stride)]
            else:
                values = _nice_ticks(self.y0, self.y1)
                labels = [f"{v:g}" for v in values]
            for v, s in zip(values, labels):
                _, y = self.px(self.x0, v)
                if grid:
                    d.line([(left, y), (right, y)], fill=(235, 235, 235))
                d.line([(left - 4, y), (left, y)], fill="black")
                w, h = _text_size(d, s, font)
                d.text((left - 7 - w, y - h / 2 - 2), s, fill="black", font=font)
        d.rectangle(self.box, outline="black")
        bold = _font(13)
        d.text((left, top - 20), title, fill="black", font=bold)
        w, _ = _text_size(d, xlabel, font)
        d.text(((left + right - w) / 2, bottom + 22), xlabel, fill="black", font=font)
        if ylabel:
            d.text((left + 4, top + 3), ylabel, fill=(90, 90, 90), font=font)

    def line(self, xs: Sequence[float], ys: Sequence[float], color: tuple[int, int, int], width: int = 2) -> None:
        pts = [self.px(x, y) for x, y in zip(xs, ys) if not self.logy or y > 0]
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=width)

    def dots(self, xs: Sequence[float], ys: Sequence[float], color: tuple[int, int, int], r: float = 3.0) -> None:
        for x, y in zip(xs, ys):
            if self.logy and y <= 0:
                continue
            cx, cy = self.px(x, y)
            self.draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, fill=color)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int], str]], corner: str = "ur") -> None:
        """``entries``: (label, colour, "line" | "dots"), in a box at the upper right/left corner."""
        d, font = self.draw, _font(11)
        left, top, right, _ = self.box
        w = max(_text_size(d, s, font)[0] for s, _, _ in entries) + 34
        x = right - w - 6 if corner == "ur" else left + 6
        y = top + 20
        d.rectangle([x, y, x + w, y + 16 * len(entries) + 4], fill="white", outline=(180, 180, 180))
        for k, (label, color, kind) in enumerate(entries):
            yy = y + 10 + 16 * k
            if kind == "line":
                d.line([(x + 5, yy), (x + 23, yy)], fill=color, width=2)
            else:
                d.ellipse([x + 11, yy - 3, x + 17, yy + 3], fill=color)
            d.text((x + 29, yy - 7), label, fill="black", font=font)


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (width, height), "white")
    return im, ImageDraw.Draw(im)


# -- pipeline helpers --------------------------------------------------------------------------------

def _run(pipe: "Pipeline", prompt: str, *, seed: int, steps: int, sampler: str, guidance_scale: float,
         schedule: str | None = None, callback: Callable | None = None,
         step_hook: Callable | None = None) -> torch.Tensor:
    """txt2img to a latent through the pipeline's one sampling loop, with its step hooks."""
    return pipe._generate(prompt, "", steps=steps, guidance_scale=guidance_scale, width=None, height=None, seed=seed,
                          sampler=sampler, schedule=schedule, batch_size=1, eta=None, latents=None,
                          callback=callback, output_type="latent", progress=False, clip_skip=1,
                          step_hook=step_hook)


def _decode(pipe: "Pipeline", latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """``pipe.decode_latents`` in chunks (a 512 px SD VAE decode is memory hungry) → CPU ``[N, 3, H, W]``."""
    return torch.cat([pipe.decode_latents(z).cpu() for z in latents.split(chunk)])


def _load_image(pipe: "Pipeline", image: ImageLike, prompt: str, seed: int, steps: int) -> torch.Tensor:
    """``[1, 3, H, W]`` in [0, 1]: a file, a PIL image, a tensor, or (None) the model's drawing of ``prompt``."""
    if image is None:
        arr = pipe.txt2img(prompt, seed=seed, steps=steps, output_type="np")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        return x[None] if x.ndim == 3 else x[:1]
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise ArgumentError(f"image {path} does not exist")
        image = Image.open(path)
    image = image.convert("RGB")
    f = max(8, pipe.vae_factor)
    w, h = max(f, image.width // f * f), max(f, image.height // f * f)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _vp_scale(sigma: float) -> float:
    """1 / sqrt(1 + σ²): the k-samplers' x = x0 + σ ε times this is the VP x_t the UNet sees (c_in)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


# -- the figures -------------------------------------------------------------------------------------

@torch.no_grad()
def latent_space(pipe: "Pipeline", image: ImageLike = None, outdir: PathLike = "docs/figures", *,
                 prompt: str = DEFAULT_PROMPT, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS,
                 cell: int = 96) -> dict[str, Any]:
    """An image, the channels of its latent ``z = E(x).mean · scale_factor`` and the decoded ``D(z / scale_factor)``.

    Writes ``latent_space.png``. Returns ``files``, ``image`` ``[1, 3, H, W]``, ``latent`` ``[1, C, h, w]``
    (scaled), ``scale_factor``, ``std_unscaled`` and ``std_scaled`` (the scale factor is chosen so that the
    latents the UNet sees have std ≈ 1), ``reconstruction`` ``[1, 3, H, W]``.
    """
    x = _load_image(pipe, image, prompt, seed, steps)
    z = pipe.encode_image(x).cpu()
    recon = _decode(pipe, z)
    sf = float(pipe.scale_factor)
    std_scaled = float(z.std())
    # Each channel shown in grey, 0.5 = 0, scaled by the largest |value| of all channels.
    m = float(z.abs().max()) or 1.0
    channels = [(z[0, c:c + 1] / m + 1) / 2 for c in range(z.shape[1])]
    row = [x[0], *channels, recon[0]]
    labels = ["image x", *[f"z[{c}]" for c in range(z.shape[1])], "D(z / f)"]
    fig = _grid([row], row_labels=[""], cell_labels=[labels], cell=cell,
                title=f"VAE latent {tuple(z.shape[1:])} of a {x.shape[3]}x{x.shape[2]} image: std(z/f) = "
                      f"{std_scaled / sf:.3f}, f = scale_factor = {sf:g}, std(z) = {std_scaled:.3f}")
    path = _output_path(outdir, "latent_space.png")
    fig.save(path)
    return {"files": [path], "image": x, "latent": z, "scale_factor": sf, "std_unscaled": std_scaled / sf,
            "std_scaled": std_scaled, "reconstruction": recon}


@torch.no_grad()
def forward_process(pipe: "Pipeline", image: ImageLike = None, outdir: PathLike = "docs/figures", *,
                    prompt: str = DEFAULT_PROMPT, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS,
                    timesteps: Sequence[int] = FORWARD_TIMESTEPS, cell: int = 80) -> dict[str, Any]:
    """The forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I) (DDPM eq. 4) at ``timesteps``.

    Row 1: the image's latent (``pipe.encode_image``) noised with ``pipe.schedule.add_noise`` — the very
    function training uses — then decoded by the VAE (``pipe.decode_latents``). Row 2: the same applied to
    the pixels in [-1, 1]. One noise draw (seeded) is used for every t, so the columns differ only by t.
    ``image``: a file, PIL image, ``[1, 3, H, W]`` tensor in [0, 1], or None for the model's drawing of ``prompt``.

    Writes ``forward_process.png``. Returns ``files``, ``t``, ``alphas_cumprod``, ``snr`` (= ᾱ/(1 − ᾱ)),
    ``image`` ``[1, 3, H, W]``, ``x0`` (the latent ``[1, C, h, w]``), ``noise``, ``latents`` (x_t, ``[T, C, h, w]``),
    ``decoded`` ``[T, 3, H, W]``, ``pixels`` (pixel-space x_t in [-1, 1], ``[T, 3, H, W]``).
    """
    schedule = pipe.schedule
    ts = [int(t) for t in timesteps]
    x = _load_image(pipe, image, prompt, seed, steps)
    z0 = pipe.encode_image(x).cpu()
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(z0.shape, generator=g)
    noise_px = torch.randn(x.shape, generator=g)
    latents = torch.cat([schedule.add_noise(z0, noise, t) for t in ts])
    pixels = torch.cat([schedule.add_noise(x * 2 - 1, noise_px, t) for t in ts])
    decoded = _decode(pipe, latents)
    abar = [float(schedule.alphas_cumprod[t]) for t in ts]
    snr = [a / (1 - a) for a in abar]
    fig = _grid([list(decoded), list((pixels + 1) / 2)], cell=cell,
                row_labels=["latent x_t,\nVAE-decoded", "pixel x_t"],
                col_labels=[f"t = {t}\nSNR {s:.3g}" for t, s in zip(ts, snr)],
                title="Forward process  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   "
                      "(schedule.add_noise; SNR = abar / (1 - abar))")
    path = _output_path(outdir, "forward_process.png")
    fig.save(path)
    return {"files": [path], "t": ts, "alphas_cumprod": abar, "snr": snr, "image": x, "x0": z0, "noise": noise,
            "latents": latents, "decoded": decoded, "pixels": pixels}


@torch.no_grad()
def timestep_embedding_figure(pipe: "Pipeline", outdir: PathLike = "docs/figures") -> dict[str, Any]:
    """The UNet's sinusoidal timestep embedding ``[cos(t f_i), sin(t f_i)]``, f_i = 10000^(-i/half), as an
    image: one row per t = 0 .. T − 1, one column per channel (blue −1, white 0, red +1).

    Writes ``timestep_embedding.png``. Returns ``files`` and ``embedding`` ``[T, model_channels]``.
    """
    from .unet.model import timestep_embedding

    T, dim = pipe.schedule.num_timesteps, pipe.config.unet.model_channels
    emb = timestep_embedding(torch.arange(T), dim)
    e = emb.clamp(-1, 1).numpy()
    # blue (-1) - white (0) - red (+1)
    rgb = np.stack([np.where(e < 0, 1 + e, 1.0), 1 - np.abs(e), np.where(e > 0, 1 - e, 1.0)], axis=-1)
    # Rows averaged down (box filter: what cannot be resolved turns grey), channels enlarged pixel-exact.
    heat = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((dim, 400), Image.BOX)
    heat = heat.resize((512, 400), Image.NEAREST)
    im, d = _canvas(620, 490)
    box = (70, 40, 70 + 512, 40 + 400)
    im.paste(heat, box[:2])
    ax = _Axes(d, box, (0, dim), (T - 1, 0))
    ax.frame(f"Timestep embedding (unet/model.py timestep_embedding), dim = {dim}",
             f"channel i: cos(t f_i) for i < {dim // 2}, then sin(t f_i)", "", grid=False)
    d.text((8, 40 + 200), "t", fill="black", font=_font(12))
    path = _output_path(outdir, "timestep_embedding.png")
    im.save(path)
    return {"files": [path], "embedding": emb}


@torch.no_grad()
def reverse_process(pipe: "Pipeline", prompt: str = DEFAULT_PROMPT, seed: int = DEFAULT_SEED,
                    sampler: str = "euler", steps: int = DEFAULT_STEPS, outdir: PathLike = "docs/figures", *,
                    guidance_scale: float = 7.5, schedule: str | None = None, cell: int = 72,
                    max_columns: int = 21, name: str | None = None) -> dict[str, Any]:
    """The reverse process of one txt2img run: at every step, the x_t the UNet sees and the x0 it predicts.

    Uses the pipeline's sampling loop (``Pipeline.sample``) with its ``step_hook(i, t, x, denoised)``.
    Column i shows the input of step i: for the k-samplers (sigma space, x = x0 + σ ε) it is shown as the
    VP latent x / sqrt(1 + σ²) = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε that the UNet receives; DDIM/PLMS/DDPM
    already work on that x_t. The last column is the output. The PNG shows at most ``max_columns`` evenly
    spaced steps (all of them for ≤ 20 steps); the GIF shows every step.

    Writes ``reverse_process_<sampler>.png`` and ``.gif`` (or ``<name>.png/.gif``). Returns ``files``,
    ``t`` and ``sigma`` (the level of each step's input), ``x_t`` ``[n, C, h, w]`` (VP), ``pred_x0``
    ``[n, C, h, w]``, ``final`` (the output latent ``[1, C, h, w]``), ``decoded_x_t``, ``decoded_x0``,
    ``decoded_final``.
    """
    from .schedulers import parse_sampler_and_schedule

    spec, schedule_id = parse_sampler_and_schedule(sampler, schedule)
    levels = spec.levels(pipe.schedule, int(steps), schedule_id)
    records: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []

    def hook(i: int, t: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
        records.append((i, t, x.detach().cpu().clone(), denoised.detach().cpu().clone()))

    final = _run(pipe, prompt, seed=seed, steps=int(steps), sampler=spec.id, schedule=schedule_id,
                 guidance_scale=guidance_scale, step_hook=hook).cpu()
    n = len(records)
    size = pipe.config.image_size
    noise = pipe.initial_noise([seed], size, size)
    # The input of step i is the state after step i - 1 (the initial noise for i = 0).
    states = [noise * float(levels[0]) if spec.family == "k" else noise] + [r[2] for r in records[:-1]]
    if spec.family == "k":
        sigmas = [float(levels[i]) for i in range(n)]
        x_t = torch.cat([s * _vp_scale(sig) for s, sig in zip(states, sigmas)])
    else:
        sigmas = [float(pipe.schedule.sigmas[int(levels[i])]) for i in range(n)]
        x_t = torch.cat(states)
    ts = [r[1] for r in records]
    pred_x0 = torch.cat([r[3] for r in records])
    dec_x, dec_x0, dec_final = _decode(pipe, x_t), _decode(pipe, pred_x0), _decode(pipe, final)

    cols = list(range(n)) if n <= max_columns else sorted({round(k * (n - 1) / (max_columns - 1))
                                                            for k in range(max_columns)})
    fig = _grid([[dec_x[i] for i in cols] + [dec_final[0]], [dec_x0[i] for i in cols]], cell=cell,
                row_labels=["x_t (input,\nVAE-decoded)", "predicted x0"],
                col_labels=[f"step {i + 1}\nt {ts[i]:.0f}" for i in cols] + ["output"],
                title=f"Reverse process: {spec.label}, {n} steps, CFG {guidance_scale:g}, seed {seed}, "
                      f"'{prompt}'")
    stem = name or f"reverse_process_{spec.id}"
    png = _output_path(outdir, f"{stem}.png")
    fig.save(png)
    frames = [_grid([[dec_x[i], dec_x0[i]]], row_labels=[""], cell=2 * cell,
                    cell_labels=[[f"x_t  (step {i + 1}/{n}, t {ts[i]:.0f})", "predicted x0"]]) for i in range(n)]
    frames.append(_grid([[dec_final[0], dec_final[0]]], row_labels=[""], cell=2 * cell,
                        cell_labels=[[f"output ({spec.label})", ""]]))
    gif = _output_path(outdir, f"{stem}.gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=[300] * n + [1500], loop=0)
    return {"files": [png, gif], "t": ts, "sigma": sigmas, "x_t": x_t, "pred_x0": pred_x0, "final": final,
            "decoded_x_t": dec_x, "decoded_x0": dec_x0, "decoded_final": dec_final}


@torch.no_grad()
def _visited_timesteps(spec: Any, schedule: Any, steps: int) -> list[float]:
    """The timestep each step of a ``steps``-step run of sampler ``spec`` (its default schedule) starts from,
    as its callback reports it: DPM fast takes fewer, larger steps than ``steps``, DPM adaptive picks its own,
    Restart goes back up to a higher noise level and down again. The run is on a stand-in problem, data
    N(0, 1) with its exact noise prediction E[eps | x_t] = sqrt(1 - alphabar_t) x_t, on an 8x8 latent: the
    levels of every other sampler do not depend on the model, and DPM adaptive's depend on it only mildly."""
    from .schedulers.denoiser import Denoiser

    def exact_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = schedule.t_to_sigma(t.double()).reshape(-1, 1, 1, 1)
        return (x_in.double() * sigma / (1 + sigma**2).sqrt()).to(x_in.dtype)

    seen: list[float] = []

    def record(i: int, level: Any, x: torch.Tensor, denoised: torch.Tensor) -> None:
        seen.append(float(schedule.sigma_to_t(torch.tensor(float(level), dtype=torch.float64)))
                    if spec.family == "k" else float(level))

    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec.sample(Denoiser(exact_eps, schedule, "eps"), noise, spec.levels(schedule, steps),
                generator=torch.Generator().manual_seed(1), callback=record)
    return seen


def schedules(pipe: "Pipeline", steps: int = DEFAULT_STEPS, outdir: PathLike = "docs/figures") -> dict[str, Any]:
    """The model's noise schedule and the levels the samplers visit.

    Panels: ᾱ_t (top left) and SNR_t = ᾱ_t / (1 − ᾱ_t) (top right, log scale), with the ``steps`` Karras
    sigmas (rho = 7, placed at t = ``schedule.sigma_to_t(σ)``); σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) (bottom left, log
    scale) with the Karras sigmas and the default uniform-in-t ones; and the timestep each step of every
    sampler of :data:`sdlite.schedulers.SAMPLERS` starts from with its default schedule, recorded from a run
    (:func:`_visited_timesteps`; second-order samplers also evaluate the network between them; the
    k-samplers' final σ = 0, the clean sample, is not a timestep and is not a step's start).

    Writes ``schedules.png``. Returns ``files``, ``t``, ``alphas_cumprod``, ``snr``, ``sigma`` (lists over
    t = 0 .. T − 1), ``karras_sigmas`` (``steps + 1`` values, ending in 0), ``karras_t``, ``uniform_sigmas``,
    ``visits`` (sampler id → the t each step starts from, in order).
    """
    from .schedulers import SAMPLERS

    s = pipe.schedule
    T = s.num_timesteps
    t = list(range(T))
    abar = s.alphas_cumprod.tolist()
    snr = (s.alphas_cumprod / (1 - s.alphas_cumprod)).tolist()
    sigma = s.sigmas.tolist()
    karras = s.get_sigmas(int(steps), "karras", dtype=torch.float64)
    uniform = s.get_sigmas(int(steps), "automatic", dtype=torch.float64)
    karras_t = s.sigma_to_t(karras[:-1]).tolist()
    uniform_t = s.sigma_to_t(uniform[:-1]).tolist()
    visits = {spec.id: _visited_timesteps(spec, s, int(steps)) for spec in SAMPLERS}
    labels = {spec.id: f"{spec.label} ({spec.default_schedule if spec.family == 'k' else 'timesteps'})"
              for spec in SAMPLERS}

    blue, red, green = _PALETTE[0], _PALETTE[1], _PALETTE[2]
    pw, ph = 520, 300
    rows_h = 16 * len(SAMPLERS)
    im, d = _canvas(2 * pw, max(2 * ph, ph + rows_h + 110))
    d.text((10, 6), f"Noise schedule (linear_start={s.linear_start:g}, linear_end={s.linear_end:g}, T={T}) "
                    f"and the levels of {steps}-step sampling", fill="black", font=_font(14))
    k_abar = [1 / (1 + v * v) for v in karras[:-1].tolist()]
    # alphabar
    ax = _Axes(d, (70, 60, pw - 20, ph - 30), (0, T - 1), (0, 1.02))
    ax.frame("alphabar_t = prod (1 - beta_s)", "t", "")
    ax.line(t, abar, blue)
    ax.dots(karras_t, k_abar, red)
    ax.legend([("model", blue, "line"), (f"Karras, {steps} steps", red, "dots")])
    # SNR
    ax = _Axes(d, (pw + 70, 60, 2 * pw - 20, ph - 30), (0, T - 1), (min(snr) / 2, max(snr) * 2), logy=True)
    ax.frame("SNR_t = alphabar / (1 - alphabar)  (log)", "t", "")
    ax.line(t, snr, blue)
    ax.dots(karras_t, [a / (1 - a) for a in k_abar], red)
    ax.legend([("model", blue, "line"), (f"Karras, {steps} steps", red, "dots")])
    # sigma
    ax = _Axes(d, (70, ph + 50, pw - 20, 2 * ph - 40), (0, T - 1), (min(sigma) / 2, max(sigma) * 2), logy=True)
    ax.frame("sigma_t = sqrt((1 - alphabar) / alphabar)  (log)", "t", "")
    ax.line(t, sigma, blue)
    ax.dots(uniform_t, uniform[:-1].tolist(), green, r=2.5)
    ax.dots(karras_t, karras[:-1].tolist(), red)
    ax.legend([("model", blue, "line"), (f"Karras, {steps} steps", red, "dots"),
               (f"automatic (uniform t), {steps}", green, "dots")], corner="ul")
    # visits
    top = ph + 50
    left = pw + 200
    ax = _Axes(d, (left, top, 2 * pw - 20, top + rows_h + 10), (0, T - 1), (0, 1))
    ax.frame("timesteps each sampler visits", "t", "", yticks=False)
    font = _font(11)
    for k, spec in enumerate(SAMPLERS):
        y = top + 13 + 16 * k
        d.line([(left, y), (2 * pw - 20, y)], fill=(230, 230, 230))
        label = labels[spec.id]
        d.text((left - 6 - _text_size(d, label, font)[0], y - 7), label, fill="black", font=font)
        for tv in visits[spec.id]:
            x, _ = ax.px(tv, 0)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_PALETTE[k % len(_PALETTE)])
    path = _output_path(outdir, "schedules.png")
    im.save(path)
    return {"files": [path], "t": t, "alphas_cumprod": abar, "snr": snr, "sigma": sigma,
            "karras_sigmas": karras.tolist(), "karras_t": karras_t, "uniform_sigmas": uniform.tolist(),
            "visits": visits}


@torch.no_grad()
def guidance(pipe: "Pipeline", prompt: str = DEFAULT_PROMPT, seed: int = DEFAULT_SEED,
             scales: Sequence[float] = (1, 3, 7.5, 12), outdir: PathLike = "docs/figures", *,
             steps: int = DEFAULT_STEPS, sampler: str = "euler", early: float = 0.25,
             trajectory_scale: float = 7.5, cell: int = 96) -> dict[str, Any]:
    """Classifier-free guidance (Ho & Salimans 2022): ``out = out_uncond + s (out_cond − out_uncond)``.

    Row 1: the same seed finished at each scale s. Row 2: at an early step (``int(early · steps)``, on the
    trajectory guided with ``trajectory_scale``) the predicted x0 with guidance s, computed by the pipeline's
    own guided model function. Row 3: the predicted x0 of the unconditional (empty prompt) and the conditional
    prediction alone at that step, and their pixel difference (brightened to its maximum). Since x0 is an
    affine function of the network output at a fixed x, the guided x0 is ``x0_u + s (x0_c − x0_u)``.

    Writes ``guidance.png``. Returns ``files``, ``scales``, ``final_latents`` ``[S, C, h, w]``, ``step``,
    ``t``, ``sigma``, ``x`` (the sigma-space state at that step), ``pred_x0_cond``, ``pred_x0_uncond``,
    ``pred_x0_guided`` ``[S, C, h, w]``.
    """
    from .schedulers import Denoiser, parse_sampler_and_schedule

    spec, schedule_id = parse_sampler_and_schedule(sampler)
    scales = [float(s) for s in scales]
    finals = torch.cat([_run(pipe, prompt, seed=seed, steps=int(steps), sampler=spec.id, guidance_scale=s).cpu()
                        for s in scales])
    # The state entering step k: stop the trajectory after step k - 1 (a callback returning False stops it).
    levels = spec.levels(pipe.schedule, int(steps), schedule_id)
    n = len(levels) - 1 if spec.family == "k" else len(levels)
    k = min(max(int(early * n), 0), n - 1)
    size = pipe.config.image_size
    if k == 0:
        noise = pipe.initial_noise([seed], size, size)
        x = noise * float(levels[0]) if spec.family == "k" else noise
    else:
        x = _run(pipe, prompt, seed=seed, steps=int(steps), sampler=spec.id, guidance_scale=trajectory_scale,
                 callback=lambda i, t, x: False if i >= k - 1 else None).cpu()
    if spec.family == "k":
        sigma = float(levels[k])
    else:  # VP x_t → sigma space x = x_t · sqrt(1 + σ²)
        sigma = float(pipe.schedule.sigmas[int(levels[k])])
        x = x / _vp_scale(sigma)
    t = float(pipe.schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
    cond, uncond = pipe.encode_prompt([prompt]), pipe.encode_prompt([""])
    x_dev = x.to(pipe.device)

    def pred_x0(c: torch.Tensor, u: torch.Tensor | None, s: float) -> torch.Tensor:
        den = Denoiser(pipe._model_fn(c, u, s), pipe.schedule, pipe.config.prediction)
        return den(x_dev, sigma).cpu()

    x0_c, x0_u = pred_x0(cond, None, 1.0), pred_x0(uncond, None, 1.0)
    x0_s = torch.cat([pred_x0(cond, uncond, s) for s in scales])
    dec_final, dec_s = _decode(pipe, finals), _decode(pipe, x0_s)
    dec_cu = _decode(pipe, torch.cat([x0_u, x0_c]))
    diff = (dec_cu[1] - dec_cu[0]).abs().mean(0, keepdim=True)
    max_diff = float(diff.max())
    diff = diff / (max_diff or 1.0)
    row_labels = ["final image", f"predicted x0\nat step {k + 1}/{n}\n(t {t:.0f})", f"step {k + 1},\nno guidance"]
    captions = ["uncond (\"\")", "cond", f"|cond - uncond|\n(max {max_diff:.2g})"]
    fig = _grid([list(dec_final), list(dec_s), [dec_cu[0], dec_cu[1], diff]], cell=cell, row_labels=row_labels,
                col_labels=[f"scale {s:g}" for s in scales], cell_labels=[[], [], captions],
                title=f"Classifier-free guidance: eps = eps_u + s (eps_c - eps_u); {spec.label}, {steps} steps, "
                      f"seed {seed}, '{prompt}'")
    path = _output_path(outdir, "guidance.png")
    fig.save(path)
    return {"files": [path], "scales": scales, "final_latents": finals, "step": k, "t": t, "sigma": sigma, "x": x,
            "pred_x0_cond": x0_c, "pred_x0_uncond": x0_u, "pred_x0_guided": x0_s}


def figure_names(samplers: Sequence[str] = REVERSE_SAMPLERS) -> list[str]:
    """The file names :func:`explain_all` writes (and only these)."""
    from .schedulers import get_sampler

    reverse = [f"reverse_process_{get_sampler(s).id}.{ext}" for s in samplers for ext in ("png", "gif")]
    return ["latent_space.png", "forward_process.png", "timestep_embedding.png", "schedules.png", *reverse,
            "guidance.png"]


def explain_all(pipe: "Pipeline", outdir: PathLike = "docs/figures", *, prompt: str = DEFAULT_PROMPT,
                seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, image: ImageLike = None,
                samplers: Sequence[str] = REVERSE_SAMPLERS) -> dict[str, Any]:
    """Every figure of docs/how-it-works.md into ``outdir``; returns each function's result by name
    (``reverse_process`` is a dict sampler id → result)."""
    for name in figure_names(samplers):  # check every target before any work
        _output_path(outdir, name)
    x = _load_image(pipe, image, prompt, seed, steps)  # drawn once, shared by the two image figures
    return {
        "latent_space": latent_space(pipe, x, outdir),
        "forward_process": forward_process(pipe, x, outdir, seed=seed),
        "timestep_embedding": timestep_embedding_figure(pipe, outdir),
        "schedules": schedules(pipe, steps, outdir),
        "reverse_process": {s: reverse_process(pipe, prompt, seed, s, steps, outdir) for s in samplers},
        "guidance": guidance(pipe, prompt, seed, outdir=outdir, steps=steps),
    }


# -- command line ------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, default_outdir: PathLike = "docs/figures") -> int:
    """``scripts/explain.py``: draw every figure with the bundled model (or ``--ckpt``) into ``--outdir``."""
    p = argparse.ArgumentParser(prog="explain.py", description=(
        "Draw the figures of docs/how-it-works.md: the forward and reverse processes, the schedules and "
        "classifier-free guidance. Without --ckpt, the bundled model is used. Only fixed file names inside "
        "--outdir are written (earlier figures there are replaced)."))
    p.add_argument("--ckpt", type=Path, default=None, help="a .ckpt/.safetensors in the original layout")
    p.add_argument("--outdir", type=Path, default=Path(default_outdir), help=f"default: {default_outdir}")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--image", type=Path, default=None,
                   help="an image for the latent-space and forward-process figures (default: the model draws one)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    args = p.parse_args(argv)
    from .pipeline import load

    try:
        if args.steps < 1:
            raise ArgumentError(f"--steps must be >= 1, got {args.steps}")
        if args.image is not None and not args.image.is_file():
            raise ArgumentError(f"--image {args.image} does not exist")
        start = time.perf_counter()
        pipe = load(args.ckpt, device=args.device)
        results = explain_all(pipe, args.outdir, prompt=args.prompt, seed=args.seed, steps=args.steps,
                              image=args.image)
    except SdliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = [f for r in results.values() for rr in (r.values() if "files" not in r else [r]) for f in rr["files"]]
    for f in files:
        print(f)
    print(f"{len(files)} files in {time.perf_counter() - start:.1f} s ({pipe.name})")
    return 0
