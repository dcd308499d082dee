"""Random checkpoints in the exact original layout, made by the tests themselves (no downloads).

- ``tsv_state_dict``: every key and shape of a real SD1/SD2 file (tests/data/sd*.tsv), as meta
  tensors (no memory) or real random tensors.
- ``tiny_state_dict``: a small model with the same key *structure*, written with our networks and
  extended with what the original files also carry (DDPM buffers, position_ids, EMA copies).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlite.checkpoint import DDPM_BUFFERS, SD1_POSITION_IDS, build_networks, ema_key, iter_keys, state_dict_of
from sdlite.config import ModelConfig, TextConfig, UNetConfig, VAEConfig

DATA = Path(__file__).parent / "data"

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def tsv_rows(version: str) -> list[tuple[str, tuple[int, ...], str]]:
    return list(iter_keys((DATA / f"{version}.tsv").read_text().splitlines()))


def tsv_shapes(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """``{key without prefix: shape}`` of the rows of ``tests/data/<name>`` (``"sd1.tsv"``) under ``prefix``."""
    return {k[len(prefix):]: shape for k, shape, _ in tsv_rows(name.removesuffix(".tsv")) if k.startswith(prefix)}


def tsv_state_dict(version: str, device: str = "meta", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every key of the real file, with its shape; float tensors in ``dtype`` (default: as listed)."""
    out = {}
    for key, shape, dt in tsv_rows(version):
        t_dtype = _DTYPES[dt] if (dtype is None or dt != "float32") else dtype
        out[key] = torch.empty(shape, dtype=t_dtype, device=device)
    return out


TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                       context_dim=32)
TINY_TEXT_SD1 = TextConfig(width=32, layers=2, heads=2)
TINY_TEXT_SD2 = TextConfig(kind="openclip", width=32, layers=3, heads=2, act="gelu", skip_last_layers=1, pad_id=0,
                           projection_dim=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_SD1 = ModelConfig(version="sd1", unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT_SD1, image_size=32)
TINY_SD2 = ModelConfig(version="sd2", unet=UNetConfig(model_channels=32, channel_mult=(1, 2),
                                                       attention_resolutions=(1, 2), num_heads=-1,
                                                       num_head_channels=16, context_dim=32,
                                                       use_linear_in_transformer=True),
                       vae=TINY_VAE, text=TINY_TEXT_SD2, image_size=32)


def random_networks(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> dict[str, torch.nn.Module]:
    """The three networks of ``cfg`` with seeded random weights (every tensor, not the default init,
    so zero-initialised layers are non-zero and a wrong load shows up in the outputs)."""
    nets = build_networks(cfg)
    g = torch.Generator().manual_seed(seed)
    for name in ("unet", "vae", "text_encoder"):
        sd = {}
        for k, v in nets[name].state_dict().items():
            if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln_1.weight",
                           "ln_2.weight", "ln_final.weight", "layer_norm1.weight", "layer_norm2.weight",
                           "final_layer_norm.weight", "norm_out.weight")) or ".norm." in k and k.endswith("weight"):
                sd[k] = 1 + std * torch.randn(v.shape, generator=g)
            else:
                sd[k] = std * torch.randn(v.shape, generator=g)
        nets[name].load_state_dict(sd, strict=True, assign=True)
        nets[name].eval().requires_grad_(False)
    return nets


def original_state_dict(cfg: ModelConfig, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                        buffers: bool = True, position_ids: str | None = "int", ema: bool = False,
                        old_clip: bool = False) -> dict[str, torch.Tensor]:
    """A state dict as the original code writes it for ``cfg``: networks + DDPM buffers + extras."""
    nets = random_networks(cfg, seed)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict_of(nets, cfg).items()}
    if buffers:
        for name in DDPM_BUFFERS:
            sd[name] = torch.rand(cfg.timesteps).to(dtype)
    if cfg.text.kind == "clip" and position_ids is not None:
        ids = torch.arange(cfg.text.max_length)[None]
        sd[SD1_POSITION_IDS] = ids if position_ids == "int" else ids.float() + 1e-3
    if ema:
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd[ema_key(k)] = sd[k] + 1.0  # distinguishable from the plain weights
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    if old_clip:
        pre = "cond_stage_model.transformer.text_model."
        sd = {("cond_stage_model.transformer." + k[len(pre):] if k.startswith(pre) else k): v for k, v in sd.items()}
    return sd


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict for ``model`` (which may live on meta) whose outputs are not degenerate.

    Weights ~ N(0, 1/fan_in) so activations stay O(1) through the whole net, including the
    convs the original zero-initialises (``out.2``, ``out_layers.3``, ``proj_out``); norm scales
    ~ 1 + N(0, 0.1^2) and biases ~ N(0, 0.02^2) so that a swapped or missing parameter shows.
    Each tensor is a window, at a random offset, of one pool of N(0, 1) draws: drawing ~860M
    fresh normals for a full-size UNet would cost more than the forward passes under test.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    pool = torch.randn(max(s.numel() for s in shapes.values()) + 4096, generator=gen)
    sd = {}
    for name, shape in shapes.items():
        offset = int(torch.randint(0, pool.numel() - shape.numel() + 1, (), generator=gen))
        noise = pool[offset : offset + shape.numel()].view(shape)
        is_norm = any(s in name for s in ("norm", "in_layers.0.", "out_layers.0.", "out.0."))
        if len(shape) == 1 and is_norm and name.endswith("weight"):
            sd[name] = 1.0 + 0.1 * noise
        elif len(shape) == 1:
            sd[name] = 0.02 * noise
        else:
            sd[name] = noise * shape[1:].numel() ** -0.5
    return sd


def every_conv_by_winograd(monkeypatch, tile: int = 4) -> bool:
    """Send every 3x3, stride-1, padding-1 fp32 convolution on the CPU through Winograd's F(tile x tile,
    3x3) (``sdlite.ops.winograd_conv3x3``; by default only large maps on AVX2 CPUs take it, 4x4 tiles
    where there are enough, the less accurate of the two), so a parity test covers it at any size;
    False (nothing changed) where its kernel cannot be built."""
    from sdlite import cpu_kernels, ops

    if cpu_kernels.load_winograd() is None:
        return False
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ("cpu",))
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", {tile: 1})
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)
    return True
