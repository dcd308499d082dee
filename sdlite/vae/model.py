"""The KL autoencoder ("first stage model") of latent diffusion.

The same network as CompVis' ``ldm.models.autoencoder.AutoencoderKL`` built from
``ldm.modules.diffusionmodules.model.Encoder`` / ``Decoder``, written from that structure and
driven by :class:`sdlite.config.VAEConfig`. Parameter names equal the checkpoint keys under
``first_stage_model.`` (``encoder.down.1.block.0.nin_shortcut.weight``, ``decoder.mid.attn_1.q.weight``,
...), so a checkpoint loads with a prefix strip and ``load_state_dict(strict=True)``.

Shapes for SD (``ch=128``, ``ch_mult=(1, 2, 4, 4)``, ``z_channels=embed_dim=4``, factor f=8)::

    image [B, 3, H, W] in [-1, 1]
      -> encoder      -> [B, 2*z, H/f, W/f]   (mean and log-variance, double_z)
      -> quant_conv   -> [B, 2*embed_dim, H/f, W/f]  -> DiagonalGaussian
    latent z [B, embed_dim, H/f, W/f]          (unscaled: the pipeline divides by scale_factor first)
      -> post_quant_conv -> [B, z, H/f, W/f]
      -> decoder      -> image [B, 3, H, W], roughly in [-1, 1]

Normalisation: ``GroupNorm(32, eps=1e-6, affine=True)`` everywhere, exactly as the original.
It is not upcast by hand: PyTorch's group_norm kernels (CPU and CUDA) accumulate the mean and
variance in fp32 for fp16/bf16 inputs, and autocast runs group_norm in fp32 anyway, so an
explicit ``.float()`` round trip would only cost memory at full image resolution.
Non-linearity: swish, ``x * sigmoid(x)`` (= SiLU).

The original has per-level attention (``down.{i}.attn`` / ``up.{i}.attn``) at
``attn_resolutions``; every Stable Diffusion VAE sets ``attn_resolutions: []``, so those lists are
always empty, hold no parameters, and are left out here. Dropout is 0.0 in SD and is omitted too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import VAEConfig
from ..ops import Conv2d, GroupNorm, add_into, attention, upsample_conv


def Normalize(channels: int) -> GroupNorm:
    """The original's ``Normalize``: 32 groups, eps 1e-6, learned scale and shift."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)  # nn.GroupNorm (+ tiling, sdlite.ops)


class ResnetBlock(nn.Module):
    """``norm1 -> swish -> conv1 -> norm2 -> swish -> conv2`` plus a skip connection.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``. When the width changes the skip goes
    through a 1x1 conv, ``nin_shortcut`` ("network in network"); otherwise it is the identity.
    The VAE has no timestep embedding, so unlike the UNet's ResBlock there is no ``temb_proj``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # norm(x, silu=True) is swish(norm(x)): one fused kernel pair on CUDA (sdlite.ops.group_norm).
        # Without autograd, swish and the residual sum write into the tensors the block has just
        # made (sdlite.ops.add_into says why): bit-identical output. Autograd needs the originals.
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return add_into(h, x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions, with a residual connection.

    ``q``, ``k``, ``v`` and ``proj_out`` are 1x1 convs (as stored in the checkpoint), i.e. per-pixel
    linear maps; the head width is the full channel count ``C`` and the scale is ``C**-0.5``,
    which is ``scaled_dot_product_attention``'s default for one head.
    ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = Conv2d(channels, channels, kernel_size=1)
        self.k = Conv2d(channels, channels, kernel_size=1)
        self.v = Conv2d(channels, channels, kernel_size=1)
        self.proj_out = Conv2d(channels, channels, kernel_size=1)
        self.query_chunk: int | None = None  # the low-memory option (sdlite.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        hn = self.norm(x)
        # One head over the H*W pixels as tokens. contiguous(): with the channels strided by H*W,
        # SDPA on the CPU falls back from its fused flash kernel to the slower math path (1.4x at 64x64).
        q, k, v = (rearrange(t(hn), "b c h w -> b 1 (h w) c").contiguous() for t in (self.q, self.k, self.v))
        out = attention(q, k, v, self.query_chunk)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv.

    The original pads only right and bottom by one pixel (``F.pad(x, (0, 1, 0, 1))``) and then
    convolves with ``padding=0``; a symmetric ``padding=1`` would shift the sampling grid by a
    pixel and give different numbers with the same weights.
    ``[B, C, H, W] -> [B, C, H/2, W/2]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv. ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.cache_kernels = True  # False: the low-memory option (sdlite.ops.upsample_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), computed on the small map
        # with 2.25x fewer multiply-adds (sdlite.ops.upsample_conv).
        return upsample_conv(x, self.conv, cache=self.cache_kernels)


class MidBlock(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution, width unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> latent moments. ``[B, in_channels, H, W] -> [B, 2*z_channels (double_z), H/f, W/f]``.

    Level ``i`` runs ``num_res_blocks`` ResnetBlocks from width ``ch*ch_mult[i-1]`` (``ch`` for
    level 0) to ``ch*ch_mult[i]``, then halves the resolution unless it is the last level.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level.downsample = Downsample(block_in) if i != len(cfg.ch_mult) - 1 else None
            self.down.append(level)

        self.mid = MidBlock(block_in)
        self.norm_out = Normalize(block_in)
        out_channels = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    """Latent -> image. ``[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]``.

    Runs the levels from the lowest resolution (widest) to the highest, each with
    ``num_res_blocks + 1`` ResnetBlocks and then an upsample unless it is the last level.
    ``up`` is indexed like the encoder's ``down``: ``up[0]`` is the HIGHEST resolution and runs last
    (the original builds the list back to front with ``insert(0, ...)``; the checkpoint keys follow
    that indexing, so ``decoder.up.3`` is the first level applied).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in)

        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level.upsample = Upsample(block_in) if i != 0 else None
            levels.insert(0, level)  # keep up[i] at resolution level i, as in the checkpoint
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h, silu=True))


class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` given by the encoder.

    ``moments [B, 2*C, h, w]`` is split along channels into ``mean`` and ``logvar`` (each
    ``[B, C, h, w]``); ``logvar`` is clamped to ``[-30, 20]`` as in the original, so ``std`` can
    neither underflow to 0 nor overflow.
    """

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)``.

        The noise is drawn in fp32 on the generator's device and then moved, so a CPU generator
        gives the same latent on any device and in any dtype.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean


class AutoencoderKL(nn.Module):
    """Encoder + decoder with the 1x1 ``quant_conv`` / ``post_quant_conv`` around the latent.

    Example::

        vae = AutoencoderKL(VAEConfig())
        posterior = vae.encode(image)              # image [1, 3, 512, 512] in [-1, 1]
        z = posterior.sample(generator) * 0.18215  # scaled latent the UNet works on
        image = vae.decode(z / 0.18215)            # [1, 3, 512, 512]
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        if not cfg.double_z:
            raise ValueError("AutoencoderKL needs double_z=True: the encoder must output mean and log-variance")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """``image [B, 3, H, W]`` in [-1, 1] -> posterior over ``[B, embed_dim, H/f, W/f]``."""
        return DiagonalGaussian(self.quant_conv(self.encoder(image)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent ``z [B, embed_dim, h, w]`` -> ``image [B, 3, h*f, w*f]``, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
