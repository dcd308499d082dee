"""The one place that chooses device, dtype and autocast.

Policy (measured, see benchmarks/RESULTS.md and benchmarks/RESULTS-cuda.md):
- CUDA: fp16 weights by default (``bf16`` on request), run as they are, without autocast, as
  diffusers runs them. With half weights autocast changes no matmul or convolution; it only runs
  each GroupNorm and LayerNorm, and what follows up to the next matmul, in fp32: extra casts and
  twice the bytes. On an H100 the UNet call (CUDA graphs, batch 2 to 16) and the VAE decode took
  1.12-1.21x the time under autocast. The kernels accumulate the norms' statistics in fp32 for half
  inputs either way, and attention (SDPA) accumulates in fp32 too.
- ``"autocast"``: fp32 weights under ``torch.autocast`` to the device's half type (fp16 on CUDA,
  bf16 on the CPU): twice the weight memory, for a model that misbehaves with half weights.
- CPU: fp32 by default; ``bf16`` on request puts the *weights* in bf16 (no autocast: CPU
  autocast re-casts every weight on every call and is slower than plain bf16 weights).
- Memory format: on CUDA the UNet's weights are channels-last (NHWC), the layout tensor-core
  convolutions use natively, so cuDNN skips its NCHW<->NHWC transposes around each conv. On an
  H100 (fp16, CUDA graphs) a batch-2 UNet call took 0.86x the time, a batch-16 call 1.01x. The
  VAE stays NCHW: its decode took 1.28x with channels-last weights. The CPU stays NCHW too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import ArgumentError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "full": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or the torch dtype, or None) → torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ArgumentError(f"unknown precision {dtype!r}; use one of fp32, fp16, bf16, autocast") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    """None → CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device 'cuda' was requested but torch.cuda.is_available() is False; use --device cpu")
    return device


@dataclass(frozen=True)
class Precision:
    """Where and how the networks run: device, weight dtype, and the autocast dtype (or None)."""

    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None = None

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The autocast context (a no-op without an autocast dtype). ``cache_enabled=False`` while
        capturing a CUDA graph: autocast's cache of cast weights is freed on exit, under the graph."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache_enabled)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.weight_dtype


def choose(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Precision:
    """The policy above. ``dtype`` is the user's precision request (None = the default for the
    device; ``"autocast"`` = fp32 weights under autocast)."""
    dev = parse_device(device)
    if isinstance(dtype, str) and dtype.lower() == "autocast":
        if dev.type not in ("cuda", "cpu"):
            raise ArgumentError(f"precision 'autocast' runs on cuda or cpu, not {dev.type}; use fp16 or fp32")
        return Precision(dev, torch.float32, torch.float16 if dev.type == "cuda" else torch.bfloat16)
    want = parse_dtype(dtype)
    if dev.type == "cuda":
        return Precision(dev, want or torch.float16, None)
    if dev.type == "mps":
        return Precision(dev, want or torch.float16, None)
    return Precision(dev, want or torch.float32, None)


def unet_memory_format(device: torch.device) -> torch.memory_format:
    """The UNet weights' memory format on ``device`` (the policy above): channels-last on CUDA."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
