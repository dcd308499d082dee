"""The Stable Diffusion UNet: CompVis ``ldm.modules.diffusionmodules.openaimodel.UNetModel``.

Module and parameter names are those of the original checkpoints (under the prefix
``model.diffusion_model.``), so a CompVis/Stability state dict loads with ``strict=True`` and no
key table. One :class:`~sdlite.config.UNetConfig` drives SD1 and SD2; they differ in the context
width, in the head layout (8 heads vs. 64-wide heads) and in ``proj_in``/``proj_out`` being
1x1 convs (SD1) or Linear layers (SD2).

Layout for SD1/SD2 (``channel_mult=(1, 2, 4, 4)``, ``num_res_blocks=2``), ``ds`` = downsampling factor::

    input_blocks.0            conv_in 4 -> 320                                 ds 1
    input_blocks.1, .2        ResBlock (.0) + SpatialTransformer (.1)          ds 1
    input_blocks.3            Downsample (.0.op)                               ds 1 -> 2
    ...                       (same for 640, 1280 channels at ds 2, 4)
    input_blocks.10, .11      ResBlock only (ds 8 is not an attention resolution)
    middle_block              ResBlock, SpatialTransformer, ResBlock
    output_blocks.0 .. .11    ResBlock on [h, skip] (+ SpatialTransformer) (+ Upsample .conv)
    out                       GroupNorm, SiLU, conv 320 -> 4

Every input block's output is kept as a skip connection and concatenated (in reverse order) to
the input of one output block, which is why there are ``num_res_blocks + 1`` output blocks per level.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from einops import rearrange
from torch import nn

from sdlite.config import UNetConfig
from sdlite.ops import Conv2d, GroupNorm, Linear, add_into, attention, gelu_product, linear, rowwise, upsample_conv
from sdlite.unet import tome


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention is all you need".

    ``t``: [B] -> [B, dim] in fp32, laid out ``[cos(t * f_i), sin(t * f_i)]`` with
    ``f_i = exp(-ln(max_period) * i / half)``, ``i = 0 .. half - 1`` (the CompVis order; diffusers
    calls this ``flip_sin_to_cos=True``, ``freq_shift=0``). Fractional ``t`` is not rounded:
    sigma-based samplers evaluate the model between the integer training timesteps.
    """
    half = dim // 2
    # Computed here rather than stored as a buffer so the module works on the meta device.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(GroupNorm):
    """GroupNorm (32 groups, eps 1e-5) with its statistics in fp32, output in the input dtype;
    ``norm(x, silu=True)`` is ``F.silu(norm(x))`` (one fused kernel pair on CUDA, sdlite.ops.group_norm).

    The original ``GroupNorm32`` upcasts by hand because fp16 statistics over large feature maps
    are inaccurate. PyTorch's group_norm kernels (CPU and CUDA) and sdlite's own already accumulate
    in fp32 for fp16/bf16 inputs, so when input and weights share a dtype there is no ``.float()``
    round trip: it would cost two extra passes over every activation (measured on an H100: 7% of a
    batch-16 UNet call). Mixed dtypes (half input, fp32 weights, or the reverse) still upcast.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(32, channels, eps=eps)


# ----------------------------------------------------------------------------------------------
# Convolutional blocks
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """``x + F(x, emb)``: two 3x3 convs with the time embedding added in between.

    ``x``: [B, channels, H, W], ``emb``: [B, time_embed_dim] -> [B, out_channels, H, W].
    ``skip_connection`` is a 1x1 conv when the channel count changes, else a parameter-free identity.
    """

    def __init__(self, channels: int, time_embed_dim: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers, then + emb, then out_layers; each norm applies its SiLU (norm(x, silu=True)).
        # Without autograd the sums write into the tensors the block has just made
        # (sdlite.ops.add_into): the same numbers, fewer allocations.
        norm, _, conv = self.in_layers
        h = conv(norm(x, silu=True))
        h = add_into(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        norm, _, dropout, conv = self.out_layers
        h = conv(dropout(norm(h, silu=True)))
        return add_into(h, self.skip_connection(x))


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour), then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)
        self.cache_kernels = True  # False: the low-memory option (sdlite.ops.upsample_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), computed on the small map
        # with 2.25x fewer multiply-adds (sdlite.ops.upsample_conv).
        return upsample_conv(x, self.conv, cache=self.cache_kernels)


# ----------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (to itself when ``context`` is None).

    ``x``: [B, L, query_dim], ``context``: [B, N, context_dim] -> [B, L, query_dim].
    q, k, v have no bias; the output projection does (``to_out.0``; ``to_out.1`` is Dropout).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.query_chunk: int | None = None  # the low-memory option (sdlite.ops)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(y, "b l (heads d) -> b heads l d", heads=self.heads)
                   for y in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v, self.query_chunk)  # softmax(q k^T / sqrt(dim_head)) v
        return self.to_out(rearrange(out, "b heads l d -> b l (heads d)"))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): ``a * gelu(g)`` where ``[a, g] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        self.proj.packable = False  # forward takes row halves of its weight, which a packed weight has not

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products with the halves of ``proj`` (row views, no copy) instead of one product split
        # afterwards: the same numbers, with contiguous halves, and without the double-width output
        # (84 MB in fp32 over a batch-2 64x64 latent).
        w_a, w_gate = self.proj.weight.chunk(2)
        b_a, b_gate = (None, None) if self.proj.bias is None else self.proj.bias.chunk(2)
        return gelu_product(linear(x, w_a, b_a), linear(x, w_gate, b_gate))  # a * gelu(gate)


class FeedForward(nn.Module):
    """``net = Sequential(GEGLU(dim, 4 dim), Dropout, Linear(4 dim, dim))``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise(self.net, x)  # per token; on the CPU a few hundred tokens at a time (sdlite.ops)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, feed-forward.

    ``x``: [B, L, dim], ``context``: [B, N, context_dim] -> [B, L, dim].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)  # attends to the prompt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merging: tome.Merging | None = None) -> torch.Tensor:
        if merging is None:
            x = x + self.attn1(self.norm1(x))  # a new tensor, so without autograd the next sums go into it
        else:  # token merging (sdlite.unet.tome): self-attention over the merged tokens, matched on x
            merge = merging.match(x)
            x = x + merge.unmerge(self.attn1(merge.merge(self.norm1(x))))
        x = add_into(x, self.attn2(self.norm2(x), context))
        return add_into(x, self.ff(self.norm3(x)))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W pixels of a feature map, conditioned on ``context``.

    ``x``: [B, C, H, W], ``context``: [B, N, context_dim] -> [B, C, H, W] (residual).
    SD1 projects with 1x1 convs before flattening to [B, HW, C]; SD2 (``use_linear``) flattens
    first and projects with Linear layers. Both are the same map; only the weight shapes differ.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
        top_level: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.top_level = top_level  # at the UNet's full latent resolution, where token merging applies
        self.token_merging_ratio = 0.0  # set through UNetModel.token_merging_ratio
        self.norm = GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(channels, inner_dim)
        else:
            self.proj_in = Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )
        if use_linear:
            self.proj_out = Linear(inner_dim, channels)
        else:
            self.proj_out = Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # [B, C, H, W] -> [B, HW, C] tokens, contiguous. On CUDA, where the UNet is channels-last,
        # this is a view; an NCHW map is copied once here, instead of being copied by every
        # LayerNorm and read strided by every residual sum (on an H100: 4% of a batch-16 call; on
        # the CPU: 0.96-0.98x the UNet's time at 32x32 and 64x64 latents, session 12). The map goes
        # back to its own memory layout after the blocks, so what follows sees the layout it was
        # given (on the AVX2 machine of earlier sessions, contiguous tokens without that step made
        # the whole UNet 1.19x slower at 32x32; on the AVX-512 one it measured level either way).
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        merging = tome.Merging(h, w, self.token_merging_ratio) if self.token_merging_ratio else None
        for block in self.transformer_blocks:
            x = block(x, context, merging)
        if self.use_linear:
            x = self.proj_out(x)
        channels_last = x_in.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=layout)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also get the time embedding and transformers the context."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """Noise-prediction UNet ``eps = unet(x, t, context)`` (or v for v-prediction checkpoints).

    Example::

        unet = UNetModel(SD1_UNET)
        eps = unet(torch.randn(1, 4, 64, 64), torch.tensor(999), context)  # context [1, 77, 768]
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        time_embed_dim = mc * 4

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(
                ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer,
                top_level=ds == 1,
            )

        self.time_embed = nn.Sequential(
            Linear(mc, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)
        )

        # Encoder. skip_channels records each input block's output width for the decoder's concat.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, ch), transformer(ch), ResBlock(ch, time_embed_dim, ch)
        )

        # Decoder: one extra block per level consumes the skip of the Downsample (or conv_in).
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_embed_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _top_level_transformers(self) -> Iterator[SpatialTransformer]:
        return (m for m in self.modules() if isinstance(m, SpatialTransformer) and m.top_level)

    @property
    def token_merging_ratio(self) -> float:
        """Token merging (ToMe, :mod:`sdlite.unet.tome`) before the self-attention of the top level: the
        share of its tokens merged, 0 (off, the default) to 0.75. An approximation that trades detail for
        speed, as the A1111 web UI's setting of that name."""
        return next((m.token_merging_ratio for m in self._top_level_transformers()), 0.0)

    @token_merging_ratio.setter
    def token_merging_ratio(self, ratio: float) -> None:
        ratio = tome.check_ratio(ratio)
        for m in self._top_level_transformers():
            m.token_merging_ratio = ratio

    @contextlib.contextmanager
    def token_merging(self, ratio: float) -> Iterator[None]:
        """:attr:`token_merging_ratio` set to ``ratio`` for the ``with`` block, then restored."""
        previous = self.token_merging_ratio
        self.token_merging_ratio = ratio
        try:
            yield
        finally:
            self.token_merging_ratio = previous

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """Predict the noise (or v) in ``x`` at timestep ``t``.

        ``x``: [B, in_channels, H, W], any H, W: where ``2 ** (len(channel_mult) - 1)`` does not divide
        them, an upsampled map one row or column larger than its skip is cropped to it (A1111's rule);
        ``t``: python number, 0-d tensor or [B], integer or fractional (never rounded);
        ``context``: [B, N, context_dim], N any length (a multiple of 77 for chunked long prompts).
        Returns [B, out_channels, H, W] in the dtype of the weights; inputs are cast to it.
        """
        dtype = self.time_embed[0].weight.dtype
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        # The sinusoids are computed in fp32 (timesteps up to 999 need the mantissa), then cast.
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            # A map of odd size n was downsampled to ceil(n / 2), so upsampling gives n + 1: drop the
            # last row/column, as the A1111 web UI does (its torch.cat resizes to the skip's size,
            # nearest) for sizes that are multiples of 8 but not of 64. A no-op otherwise.
            h = block(torch.cat([h[..., :skip.shape[-2], :skip.shape[-1]], skip], dim=1), emb, context)
        norm, _, conv = self.out
        return conv(norm(h, silu=True))
