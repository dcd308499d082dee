#!/usr/bin/env python
"""Peak activation memory of one network call, counted on the meta device (no GPU, no arithmetic).

Every tensor storage created during the call is counted from its creation until it is freed; the
peak of that sum is the call's activation peak, weights excluded. It is what a GPU's caching
allocator would need at the least: no fragmentation, no cuDNN workspaces. Attention is counted as
a fused (flash) kernel on a GPU allocates it: its output alone, no L x L matrix
(``scaled_dot_product_attention`` is replaced by an empty output of the right shape, for both
libraries). So it compares formulations, not GPUs.

Rows: the SD1.5 VAE decode of a 64x64 latent (a 512x512 image) in fp16 and one UNet call (batch 2,
64x64 latents, fp16), each by sdlite as it runs on a GPU now, by sdlite as it ran in the H100
benchmark (commit dc98d1a: the Upsample as four 2x2 convs, whose cached kernels are created in the
first call and so counted here; for the VAE also CUDA fp16 autocast, emulated: autocast runs
group_norm in fp32 and returns fp32, and casts each conv's input to fp16; nothing else in the VAE
is on autocast's lists), and by diffusers.

    python benchmarks/meta_memory.py          # ~1 minute on 2 CPU cores; prints a Markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the repository root on sys.path)

import sdlite.ops as ops  # noqa: E402
from sdlite.checkpoint import build_networks  # noqa: E402
from sdlite.config import SD1  # noqa: E402


class PeakStorage(TorchDispatchMode):
    """Sum of the bytes of the storages created inside and still alive, and its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key, (ref, n) in list(self.alive.items()):
            if ref.expired():
                del self.alive[key]
                self.live -= n
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.alive:  # a view shares its base's storage: counted once
                    self.alive[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.live += self.alive[ref.cdata][1]
        self.peak = max(self.peak, self.live)
        return out


def flash_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def peak_mib(fn: Callable[[], Any]) -> float:
    with torch.no_grad(), patch.object(F, "scaled_dot_product_attention", flash_like):
        counter = PeakStorage()
        with counter:
            fn()
    return counter.peak / 2**20


def emulated_fp16_autocast() -> Any:
    """What ``torch.autocast("cuda", float16)`` does to the VAE's ops (see the module docstring)."""
    def group_norm_fp32(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)

    conv = torch.nn.Conv2d._conv_forward

    def conv_fp16(self: torch.nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv(self, x.to(w.dtype), w, b)

    stack = [patch.object(torch.nn.GroupNorm, "forward", group_norm_fp32),
             patch.object(torch.nn.Conv2d, "_conv_forward", conv_fp16)]
    if ops.Conv2d._conv_forward is not conv:  # sdlite's Conv2d overrides it (the CPU backend choice)
        sd_conv = ops.Conv2d._conv_forward
        stack.append(patch.object(ops.Conv2d, "_conv_forward",
                                  lambda self, x, w, b: sd_conv(self, x.to(w.dtype), w, b)))
    return stack


def _drop_kernel_caches(nets: dict[str, torch.nn.Module]) -> None:
    for net in nets.values():
        for m in net.modules():
            m.__dict__.pop("_phase_cache", None)


def main() -> None:
    half = torch.float16
    nets = {k: m.to(half) for k, m in build_networks(SD1).items()}  # on meta: no memory
    dnets = bench.diffusers_networks(SD1, nets)  # the same (meta) tensors, through diffusers' converters
    with torch.device("meta"):
        z = torch.zeros(1, 4, 64, 64, dtype=half)
        x, ctx = torch.zeros(2, 4, 64, 64, dtype=half), torch.zeros(2, 77, 768, dtype=half)
        t = torch.tensor([500.0, 500.0])
    phases = patch.object(ops, "UPSAMPLE_BY_PHASES", ("meta",))
    rows = [("VAE decode 64x64 -> 512x512, fp16, sdlite now (no autocast for half weights, Upsample as written)",
             peak_mib(lambda: nets["vae"].decode(z)))]
    patches = [phases, *emulated_fp16_autocast()]
    for p in patches:
        p.start()
    try:
        rows.append(("VAE decode, fp16, sdlite as benchmarked on the H100 (fp16 autocast, emulated; Upsample "
                     "as four 2x2 convs)", peak_mib(lambda: nets["vae"].decode(z))))
    finally:
        for p in patches:
            p.stop()
        _drop_kernel_caches(nets)
    rows.append(("VAE decode, fp16, diffusers", peak_mib(lambda: dnets["vae"].decode(z).sample)))
    rows.append(("UNet call, batch 2, 64x64, fp16, sdlite now", peak_mib(lambda: nets["unet"](x, t, ctx))))
    with phases:
        rows.append(("UNet call, fp16, sdlite as benchmarked on the H100 (Upsample as four 2x2 convs)",
                     peak_mib(lambda: nets["unet"](x, t, ctx))))
    _drop_kernel_caches(nets)
    rows.append(("UNet call, fp16, diffusers", peak_mib(lambda: dnets["unet"](x, t, encoder_hidden_states=ctx).sample)))
    print("| call (counted on the meta device) | peak activation MiB |\n|---|---:|")
    for name, mib in rows:
        print(f"| {name} | {mib:,.0f} |")


if __name__ == "__main__":
    main()
