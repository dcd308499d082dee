"""The SD1 text encoder: OpenAI CLIP ViT-L/14's text transformer (Radford et al. 2021).

A GPT-2-style pre-LayerNorm transformer over 77 token positions with a causal mask. Stable
Diffusion 1.x feeds the UNet the hidden state of every position after the last layer and
``final_layer_norm`` (``FrozenCLIPEmbedder``); "Clip skip 2" stops one layer earlier.

Module names are those of Hugging Face ``CLIPTextModel`` (transformers 4.x), which SD1
checkpoints store under ``cond_stage_model.transformer.``::

    text_model.embeddings.token_embedding.weight          [vocab, width]
    text_model.embeddings.position_embedding.weight       [max_length, width]
    text_model.encoder.layers.N.layer_norm1 / layer_norm2
    text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj
    text_model.encoder.layers.N.mlp.fc1 / fc2             width -> mlp_ratio*width -> width
    text_model.final_layer_norm

The checkpoints' ``position_ids`` buffer is not kept: positions are ``arange(N)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlite.config import TextConfig
from sdlite.ops import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, width] -> [B, N, width]``; token i attends to tokens 0..i."""
        q, k, v = (rearrange(proj(x), "b n (heads d) -> b heads n d", heads=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return self.out_proj(rearrange(out, "b heads n d -> b n (heads d)"))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_ratio * cfg.width, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` ids -> ``[B, N, width]`` token + learned absolute position embeddings."""
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """SD1's ``cond_stage_model.transformer``: ids ``[B, N]`` -> per-token features ``[B, N, width]``.

    Example::

        >>> from sdlite.config import SD1_TEXT
        >>> model = CLIPTextModel(SD1_TEXT)
        >>> model(torch.zeros(2, 77, dtype=torch.long)).shape
        torch.Size([2, 77, 768])
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor, skip_last_layers: int | None = None) -> torch.Tensor:
        """Hidden state after layer ``layers - skip_last_layers``, then ``final_layer_norm``.

        ``ids``: ``[B, N]`` int64 with ``N <= max_length`` (BOS, tokens, EOS, padding).
        ``skip_last_layers``: 0 = the last layer (SD1), 1 = the penultimate ("Clip skip 2");
        ``None`` uses ``cfg.skip_last_layers``.
        Returns ``[B, N, width]`` in the parameters' dtype.
        """
        skip = self.cfg.skip_last_layers if skip_last_layers is None else skip_last_layers
        if not 0 <= skip < self.cfg.layers:
            raise ValueError(f"skip_last_layers must be in [0, {self.cfg.layers - 1}], got {skip}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"at most {self.cfg.max_length} tokens per sequence, got {ids.shape[1]}")
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: self.cfg.layers - skip]:
            x = layer(x)
        return tm.final_layer_norm(x)
