"""CLIP text side of Stable Diffusion: the BPE tokenizer and the two text encoders.

SD1 uses OpenAI CLIP ViT-L/14 (``CLIPTextModel``, Hugging Face names), SD2 the OpenCLIP
ViT-H/14 text tower (``OpenCLIPTextModel``, OpenCLIP names); ``TextConfig.kind`` picks one.

Example::

    >>> from sdlite.config import SD1_TEXT
    >>> tok, encoder = tokenizer_for(SD1_TEXT), build_text_encoder(SD1_TEXT)
    >>> encoder(tok(["a photo of a cat"])).shape
    torch.Size([1, 77, 768])
"""

from __future__ import annotations

from torch import nn

from sdlite.clip.model import CLIPTextModel
from sdlite.clip.openclip import OpenCLIPTextModel
from sdlite.clip.tokenizer import CLIPTokenizer
from sdlite.config import TextConfig

__all__ = ["CLIPTextModel", "CLIPTokenizer", "OpenCLIPTextModel", "build_text_encoder", "tokenizer_for"]


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    """The text encoder network for ``cfg.kind`` ("clip": SD1, "openclip": SD2), randomly initialized.

    Build it under ``with torch.device("meta"):`` and load weights with
    ``load_state_dict(sd, assign=True)`` to skip the random initialization.
    """
    if cfg.kind == "clip":
        return CLIPTextModel(cfg)
    if cfg.kind == "openclip":
        return OpenCLIPTextModel(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; expected 'clip' or 'openclip'")


def tokenizer_for(cfg: TextConfig) -> CLIPTokenizer:
    """The tokenizer that feeds ``build_text_encoder(cfg)``: same length, the version's pad id."""
    return CLIPTokenizer(pad_id=cfg.pad_id, max_length=cfg.max_length)
