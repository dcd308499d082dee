"""The SD2 text encoder: the text tower of OpenCLIP ViT-H/14 (LAION-2B).

The same pre-LayerNorm causal transformer as OpenAI CLIP (see ``model.py``), with GELU, width
1024, 24 layers, 16 heads, and OpenCLIP's module names, which SD2 checkpoints store under
``cond_stage_model.model.``::

    token_embedding.weight                          [vocab, width]
    positional_embedding                            [max_length, width]   (a bare Parameter)
    transformer.resblocks.N.ln_1 / ln_2
    transformer.resblocks.N.attn.in_proj_weight     [3*width, width]      (q, k, v stacked)
    transformer.resblocks.N.attn.in_proj_bias       [3*width]
    transformer.resblocks.N.attn.out_proj
    transformer.resblocks.N.mlp.c_fc / c_proj       width -> mlp_ratio*width -> width
    ln_final
    text_projection                                 [width, projection_dim]  (unused by SD)
    logit_scale                                     []                       (unused by SD)

(the last two only when ``cfg.projection_dim > 0``).

SD2 uses ``FrozenOpenCLIPEmbedder(layer="penultimate")``: it runs every resblock but the last,
then ``ln_final`` (``cfg.skip_last_layers = 1``). The pooled/projected CLIP embedding is not used,
but ``text_projection`` and ``logit_scale`` are kept so checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlite.config import TextConfig
from sdlite.clip.model import ACTIVATIONS
from sdlite.ops import Linear, linear


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with one packed q/k/v projection (``nn.MultiheadAttention``'s names)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, width] -> [B, N, width]``; token i attends to tokens 0..i."""
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # q, k and v in one matmul
        q, k, v = rearrange(qkv, "b n (three heads d) -> three b heads n d", three=3, heads=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return self.out_proj(rearrange(out, "b heads n d -> b n (heads d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.act = ACTIVATIONS[act]
        self.c_proj = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = MultiheadSelfAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio * cfg.width, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """SD2's ``cond_stage_model.model`` (text side): ids ``[B, N]`` -> features ``[B, N, width]``.

    Example::

        >>> from sdlite.config import SD2_TEXT
        >>> with torch.device("meta"):
        ...     model = OpenCLIPTextModel(SD2_TEXT)
        >>> model(torch.zeros(2, 77, dtype=torch.long, device="meta")).shape
        torch.Size([2, 77, 1024])
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # The CLIP contrastive head, present only when cfg.projection_dim > 0 (SD2: 1024).
        self.text_projection: nn.Parameter | None = None
        self.logit_scale: nn.Parameter | None = None
        if cfg.projection_dim > 0:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
            # The learned softmax temperature, stored as log(1 / 0.07) at initialization.
            self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def forward(self, ids: torch.Tensor, skip_last_layers: int | None = None) -> torch.Tensor:
        """Output of resblock ``layers - skip_last_layers``, then ``ln_final``.

        ``ids``: ``[B, N]`` int64 with ``N <= max_length`` (BOS, tokens, EOS, 0-padding).
        ``skip_last_layers``: 1 = the penultimate block (SD2), 0 = the last; ``None`` uses
        ``cfg.skip_last_layers``. Returns ``[B, N, width]`` in the parameters' dtype.
        """
        skip = self.cfg.skip_last_layers if skip_last_layers is None else skip_last_layers
        if not 0 <= skip < self.cfg.layers:
            raise ValueError(f"skip_last_layers must be in [0, {self.cfg.layers - 1}], got {skip}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"at most {self.cfg.max_length} tokens per sequence, got {ids.shape[1]}")
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks[: self.cfg.layers - skip]:
            x = block(x)
        return self.ln_final(x)
