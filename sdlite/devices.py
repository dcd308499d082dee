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
  autocast re-casts every weight on every call and is slower than plain bf16 weights). Where the
  CPU has no native half-precision kernels (x86 without AVX512-BF16/AMX for bf16, without
  AVX512-FP16/AMX-FP16 for fp16), PyTorch computes bf16/fp16 matmuls and convolutions in reference
  loops: on this project's AVX2 machine 1.2 GFLOP/s for a bf16 matmul and 0.7 for a convolution,
  against 140-180 for fp32 matmuls (a 512x512 image would take hours). There sdlite's own
  convolutions and linear layers (:mod:`sdlite.ops`) compute half inputs in fp32 and round the
  result back, which is the arithmetic of a native half kernel: bf16 weights then cost 0.92-1.15x
  the fp32 time for half the weight memory (benchmarks/RESULTS-bf16-cpu.md). An AVX-512 CPU
  without AVX512-BF16 counts as without native bf16 (:func:`cpu_has_native_bf16`): oneDNN emulates
  bf16 there, and its kernels took 2.4-2.7x the fp32 time against 1.18-1.28x computed in fp32
  (benchmarks/RESULTS-bf16-emulated.md). ``"autocast"`` casts inside PyTorch's own kernels,
  out of sdlite's reach, so on such a CPU it stays slow and warns.
- Memory format: on CUDA the UNet's weights are channels-last (NHWC), the layout tensor-core
  convolutions use natively, so cuDNN skips its NCHW<->NHWC transposes around each conv. On an
  H100 (fp16, CUDA graphs) NCHW weights took 1.15x the time of a batch-2 UNet call, but 0.93x at
  batch 16 (benchmarks/RESULTS-cuda.md, session 14): channels-last is kept for the usual small
  batches. The VAE stays NCHW: its decode took 1.25x with channels-last weights. The CPU stays NCHW too.
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ArgumentError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "full": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or the torch dtype, or None) → torch dtype or None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():  # an integer, fp64 or fp8 model would fail only at its first step
            raise ArgumentError(f"precision {dtype} is not one sdlite runs; use torch.float32, torch.float16 "
                                "or torch.bfloat16 (or fp32, fp16, bf16, autocast)")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ArgumentError(f"unknown precision {dtype!r}; use one of fp32, fp16, bf16, autocast") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    """None → CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device 'cuda' was requested but torch.cuda.is_available() is False; use the cpu "
                            "(device='cpu', --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError("device 'mps' was requested but torch.backends.mps.is_available() is False; "
                            "use the cpu (device='cpu', --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: tensors sdlite cannot sample on
        raise ArgumentError(f"device {str(device)!r} is not one sdlite generates on; use cpu, cuda, cuda:1 or mps")
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
        precision = Precision(dev, torch.float32, torch.float16 if dev.type == "cuda" else torch.bfloat16)
    else:
        default = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
        precision = Precision(dev, parse_dtype(dtype) or default, None)
    if dev.type == "cpu" and precision.autocast_dtype is not None:
        _warn_if_slow_on_this_cpu(precision.autocast_dtype)
    return precision


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether PyTorch has native (oneDNN) kernels for ``dtype`` on this CPU. Only x86 is judged;
    elsewhere (ARM has its own bf16/fp16 paths) the answer is True: nothing measured says otherwise.

    For bf16 that takes bf16 instructions (:func:`cpu_has_native_bf16`), not only oneDNN's bf16
    kernels: on an AVX-512 CPU without AVX512-BF16 (Intel's Xeons from Skylake to Ice Lake, its
    Ice Lake and Tiger Lake laptops) oneDNN has them, but emulates bf16 with fp32 instructions, and
    slowly: on this project's CPU with oneDNN held to ``AVX512_CORE`` a bf16 matmul reached 170
    GFLOP/s against 447 in fp32, and a UNet step at 32x32 latents with bf16 weights took 2.57x its fp32
    time, against 1.35x with the bf16 weights computed in fp32 as sdlite then does (session 21)."""
    if dtype == torch.float32 or not _is_x86():
        return True
    return _onednn_has(dtype) and (dtype != torch.bfloat16 or cpu_has_native_bf16())


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _onednn_has(dtype: torch.dtype) -> bool:
    """Whether PyTorch's oneDNN has ``dtype`` (bf16, fp16) kernels on this CPU, native or emulated."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError, TypeError):
        return True  # an unknown build: no evidence either way, so no warning


# oneDNN's instruction-set limits (ONEDNN_MAX_CPU_ISA) that still admit bf16 instructions: its names
# for AVX512-BF16, AMX, AVX512-FP16 and AVX10 CPUs, and no limit ("ALL").
_ONEDNN_BF16_ISAS = ("BF16", "AMX", "FP16", "AVX10", "ALL")


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 with bf16 instructions, AVX512-BF16 or AMX (PyTorch's
    probes), unless oneDNN is held below them (``ONEDNN_MAX_CPU_ISA``, as when measuring what such a
    CPU without them does)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(probe is not None and probe() for probe in probes):
        return False
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return any(name in limit for name in _ONEDNN_BF16_ISAS)


def _warn_if_slow_on_this_cpu(dtype: torch.dtype) -> None:
    if not cpu_has_fast(dtype):
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        units = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
        slow = ("emulates them with fp32 instructions: about 2.6x the time of fp32 (a UNet step, measured "
                "with oneDNN held to AVX512_CORE)" if _onednn_has(dtype) else
                "runs them in slow reference loops: 50-100x slower than fp32 (a 512x512 image can take hours)")
        warnings.warn(
            f"this CPU has no native {name} kernels ({units}), so under autocast PyTorch's {name} matmuls "
            f"and convolutions are slow: oneDNN {slow}. Use fp32 (the CPU default), or {name} weights "
            f"(--precision {name}, dtype='{name}'), which sdlite computes in fp32 on such a CPU.",
            RuntimeWarning, stacklevel=3)


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count for the whole process (``--threads``); None keeps torch's choice (one
    per core). Fewer threads than cores can be faster when another program keeps a core busy."""
    if threads is None:
        return
    if threads < 1:
        raise ArgumentError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)


# Whether to_device stages host tensors in pinned memory and copies them without blocking (the
# default); False restores plain blocking copies (benchmarks/bench_cuda.py measures the difference).
ASYNC_HOST_COPIES = True


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)`` for the small host tensors of a sampling step (timesteps, per-sample
    sigmas, noise drawn by CPU generators), without making the host wait for the GPU.

    Why: a copy from ordinary (pageable) host memory to a CUDA device first waits until every
    kernel already queued on the stream has finished. A sampling loop that moved a sigma that way
    each step could never run ahead of the GPU: the GPU would sit idle while Python prepared each
    next step. Staged in pinned memory, the copy is queued like a kernel; PyTorch's pinned-memory
    cache keeps the staging buffer until the copy has run. Elsewhere this is ``t.to(device, dtype)``."""
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu" or not ASYNC_HOST_COPIES:
        return t.to(device)
    try:
        staged = t.pin_memory()
    except RuntimeError:  # no pinned memory to be had: a blocking copy still gives the right values
        return t.to(device)
    return staged.to(device, non_blocking=True)


def unet_memory_format(device: torch.device) -> torch.memory_format:
    """The UNet weights' memory format on ``device`` (the policy above): channels-last on CUDA."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def system_report(device: str | torch.device | None = None) -> list[str]:
    """What sdlite will run on here, as ``name: value`` lines (``--system-info`` prints them): the
    versions, the device, on the CPU its instruction set, native half kernels, threads and load, and
    the state of sdlite's CPU kernels (attention and Winograd convolutions; built on the spot if
    needed, as the first generation would), on CUDA the GPU and Triton; then which precision is the
    fast one here. Nothing is loaded but the kernels."""
    from . import __version__

    dev = parse_device(device)
    cuda = torch.version.cuda and f", CUDA {torch.version.cuda}" or ""
    lines = [f"sdlite: {__version__}; torch {torch.__version__}{cuda}; Python {platform.python_version()}",
             f"device: {dev}" + ("" if device is not None else " (the default)")]
    if dev.type == "cpu":
        bf16 = cpu_has_fast(torch.bfloat16)
        lines += [f"CPU: {platform.machine()}, {os.cpu_count()} logical CPUs, PyTorch's capability "
                  f"{torch.backends.cpu.get_cpu_capability()}",
                  f"native half kernels: bf16 {'yes' if bf16 else 'no'}, fp16 "
                  f"{'yes' if cpu_has_fast(torch.float16) else 'no'}"]
        # With other programs holding cores, fewer threads can be faster (--threads): the load shows it.
        load = f"; load average over the last minute {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        lines.append(f"threads: {torch.get_num_threads()}{load}")
        lines.append(f"attention kernel: {_cpu_kernel_state()}")
        lines.append(f"Winograd convolutions: {_winograd_state()}")
        if not _is_x86():  # cpu_has_fast cannot tell there, and nothing was measured
            fastest = "not measured on this kind of CPU; fp32 is the default"
        elif bf16:
            fastest = "bf16 (--precision bf16): native bf16 kernels, about 2x as fast as fp32 for half the memory"
        else:
            fastest = ("fp32 (the default); bf16 weights (--precision bf16) halve the memory at 1.0-1.3x the "
                       "fp32 time (computed in fp32)")
        lines.append(f"fastest precision here: {fastest}")
    elif dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}")
        try:
            import triton

            lines.append(f"Triton: {triton.__version__} (sdlite's GroupNorm kernels)")
        except ImportError:
            lines.append("Triton: not installed (GroupNorm runs through PyTorch's kernels, slower)")
        lines.append("fastest precision here: fp16 (the default on CUDA); bf16 on request")
    return lines


def _loaded(load: Callable[[], Any]) -> tuple[Any, str]:
    """``load()`` of one of sdlite's CPU kernels (built on the spot if needed), and why it gave None:
    the warnings it would have printed, caught for the report instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = load()
    return kernel, "; ".join(str(w.message) for w in caught) or "it did not build"


def _cpu_kernel_state() -> str:
    """Which build of sdlite's CPU attention kernel runs here, and on which OpenMP runtime; or why none."""
    from . import cpu_kernels, ops

    if "cpu" not in ops.FUSED_ATTENTION:
        return "off (--no-fused-kernels)"
    if not cpu_kernels.isas():
        return "none for this CPU or system (x86-64 Linux with AVX2 or AVX-512 only); PyTorch's attention runs"
    if not cpu_kernels.may_pay():
        return f"not used: PyTorch's attention is faster with {cpu_kernels.isas()[0]} alone"
    kernel, why = _loaded(cpu_kernels.load)
    if kernel is None:
        return f"unavailable: {why}"
    dtypes = ", ".join({torch.float32: "fp32", torch.bfloat16: "bf16"}[d] for d in kernel.run
                       if cpu_kernels.cpu_supported(d))  # the dtypes ops.attention gives it here
    widest = cpu_kernels.MAX_HEAD_WIDTH.get(kernel.isa)
    heads = f"; heads up to {widest} channels wide, wider ones on PyTorch's" if widest else ""
    return (f"the {kernel.isa} build ({dtypes}{heads}), {kernel.library}, on the OpenMP runtime "
            f"{cpu_kernels.openmp_runtime() or 'of the compiler'}")


def _winograd_state() -> str:
    """Whether the 3x3 convolutions of large maps run by Winograd's minimal filtering here
    (:func:`sdlite.ops.winograd_conv3x3`), by which rule and from which library; or why not."""
    from . import cpu_kernels, ops

    if "cpu" not in ops.WINOGRAD_CONV:
        if "cpu" not in ops.FUSED_ATTENTION:  # --no-fused-kernels turns both off
            return "off (--no-fused-kernels)"
        return (f"not used with {torch.backends.cpu.get_cpu_capability()} (measured on AVX2 only); "
                f"oneDNN's direct convolution runs")
    if not cpu_kernels.isas():
        return "none for this CPU or system (x86-64 Linux only); oneDNN's direct convolution runs"
    kernel, why = _loaded(cpu_kernels.load_winograd)
    if kernel is None:
        return f"unavailable: {why}"
    rule = ", ".join(f"F({m}x{m}, 3x3) from {least} output tiles of {m}x{m}" for m, least in ops.WINOGRAD_MIN_TILES.items())
    return f"fp32 3x3 convs by {rule} (over the batch), the {kernel.isa} build, {kernel.library}"
