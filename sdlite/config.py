"""Configuration dataclasses for the three networks and the whole model.

One parametric class per network is driven by these; SD1 and SD2 differ only in the
values (context width, head layout, linear ``proj_in``/``proj_out``, text tower).
The field names follow the original CompVis/Stability YAML configs
(``v1-inference.yaml``, ``v2-inference-v.yaml``) so a reader can compare them line by line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal


@dataclass(frozen=True)
class UNetConfig:
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel`` arguments."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors ("ds" in the original) at which a SpatialTransformer follows the ResBlock.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # SD1 fixes the number of heads (8); SD2 fixes the head width (64) instead. Exactly one is > 0.
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    # SD2: proj_in/proj_out are Linear layers on [B, HW, C] instead of 1x1 convs.
    use_linear_in_transformer: bool = False

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """Number of attention heads and head width for a block of ``channels`` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """``ldm.models.autoencoder.AutoencoderKL`` ``ddconfig`` plus ``embed_dim``."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """The text encoder.

    ``kind="clip"``: OpenAI CLIP ViT-L/14 text model with Hugging Face ``CLIPTextModel`` names
    (SD1, stored under ``cond_stage_model.transformer.``), quick_gelu, output of the last layer
    followed by ``final_layer_norm``.
    ``kind="openclip"``: OpenCLIP text tower (SD2, stored under ``cond_stage_model.model.``), gelu,
    output of the penultimate layer followed by ``ln_final`` (``layer="penultimate"``).
    """

    kind: Literal["clip", "openclip"] = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Which transformer layer's output feeds the UNet: 0 = the last, 1 = the penultimate, ...
    skip_last_layers: int = 0
    pad_id: int = 49407
    mlp_ratio: int = 4
    # OpenCLIP keeps a projection and logit scale in the file although SD never uses them.
    projection_dim: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a pipeline; stored as JSON in a saved file's metadata."""

    version: Literal["sd1", "sd2", "sdlite"] = "sd1"
    prediction: Literal["eps", "v"] = "eps"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scale_factor: float = 0.18215
    # The DDPM noise schedule of the original configs ("scaled linear" in diffusers' words).
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    image_size: int = 512  # native width/height in pixels

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        parts = {
            "unet": UNetConfig,
            "vae": VAEConfig,
            "text": TextConfig,
        }
        for name, klass in parts.items():
            sub = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get(name, {}).items()}
            d[name] = klass(**sub)
        return cls(**d)

    def with_(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


SD1_TEXT = TextConfig()
SD2_TEXT = TextConfig(
    kind="openclip", width=1024, layers=24, heads=16, act="gelu", skip_last_layers=1, pad_id=0,
    projection_dim=1024,
)
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

SD1 = ModelConfig(version="sd1", prediction="eps", unet=SD1_UNET, text=SD1_TEXT, image_size=512)
SD2 = ModelConfig(version="sd2", prediction="eps", unet=SD2_UNET, text=SD2_TEXT, image_size=512)
SD2_V = SD2.with_(prediction="v", image_size=768)
