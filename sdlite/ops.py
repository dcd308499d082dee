"""The compute kernels the UNet and the VAE share, each with one performance or memory choice.

:func:`attention` — scaled dot-product attention, optionally a slice of queries at a time (the
low-memory option); on an x86 Linux CPU with AVX-512 or AVX2, fp32 (and bf16) attention through
sdlite's own C++ kernel (:mod:`sdlite.cpu_kernels`), and elsewhere the self-attention of large maps as chunked
GEMMs (faster there than PyTorch's fused kernel). ``softmax(q kᵀ / √d) v`` is independent for
every query row, so computing it for ``chunk`` queries at a time gives the same numbers while the
``[L, N]`` score matrix only ever exists for ``chunk`` rows. On a GPU whose SDPA falls back to the
plain ("math") kernel — large head sizes such as the VAE's single 512-wide head, or older cards —
this bounds the peak memory of attention over 4096+ tokens; where a fused kernel runs, chunking
only costs a little speed.

:func:`linear` / :class:`Linear` — fp32 matrix products on an x86 CPU through oneDNN's GEMM
instead of PyTorch's default BLAS (MKL). On this project's AMD EPYC machines MKL's ``sgemm`` ran
at ~210 GFLOP/s on 2 threads, on the AVX2 one and on the AVX-512 one (MKL takes a generic code
path on non-Intel CPUs), while oneDNN, the library PyTorch already uses for every CPU convolution,
reached ~430 on the AVX2 machine and 410-490 on the AVX-512 one, 1.4-2.4x per linear layer of the
three networks (benchmarks/RESULTS.md, "Levers"). Same matrix product, different summation
order: results agree to float rounding.

:class:`Conv2d` — ``nn.Conv2d`` (same parameters, same state-dict names) that runs the
convolutions of small maps as one matrix product: the input unrolled into ``[batch·H·W, C_in·k·k]``
rows (im2col, a strided view copied once) times the weight, as it is stored, ``[C_out, C_in·k·k]``,
through the same oneDNN GEMM. PyTorch's oneDNN convolution is fast on large maps but slow on the
UNet's low-resolution levels at batch 2 (8x8 and 4x4 maps, 1280 channels: 130 and 45 GFLOP/s on
this project's AVX-512 machine, against 290-390 as a GEMM); which convolutions take the GEMM is a
rule per dtype below (``GEMM_CONV_MAX_ROWS``, ``GEMM_CONV_LARGE_K``). Both paths compute the same
convolution; results agree to float rounding.

:func:`pack` — on the CPU, :class:`Linear` and :class:`Conv2d` weights stored once in oneDNN's own
blocked layout, which it otherwise re-creates from the plain weight on every call (a full pass over
the weight, as costly as the product on the UNet's low-resolution levels). :func:`sdlite.load` packs;
the whole SD1.5 UNet then ran 0.83-0.91x the time in fp32 and bf16. Packed convs replace the im2col
GEMM on small maps and run channels-last.

:class:`Conv2d` and :class:`Linear` (and :func:`linear`, for a bare weight) — on a CPU without
native half-precision kernels (x86 without AVX512-BF16/AMX for bf16, without AVX512-FP16/AMX-FP16
for fp16: ``HALF_AS_FP32``), a bf16 or fp16 input is computed in fp32 and the result rounded back.
PyTorch runs half matmuls and convolutions there in reference loops, tens of times slower than
fp32 (on this project's AVX2 machine a 640x640 matmul took 26x, a 320-channel 3x3 conv 37x the fp32
time; benchmarks/RESULTS-bf16-cpu.md has whole networks), or, on AVX-512 CPUs without AVX512-BF16,
through oneDNN's emulation of bf16 at a third of the fp32 speed (a UNet step 2.4-2.7x the fp32 time
against 1.18-1.28x computed in fp32; benchmarks/RESULTS-bf16-emulated.md). It is the same
arithmetic a native kernel does: the product of two bf16 (or fp16) numbers is exact in fp32, the
sums accumulate in fp32, and the output is rounded once to the half type. So bf16 weights keep
their purpose — half the memory — at close to fp32 speed.

:func:`group_norm` — GroupNorm, and the SiLU after it when asked (``norm(x, silu=True)``). On
CUDA two fused Triton kernels (:mod:`sdlite.kernels`): PyTorch's CUDA group_norm only takes NCHW
maps, so a channels-last map was copied to NCHW and back around it, and the SiLU was a pass of its
own. Elsewhere PyTorch's kernel.

:func:`gelu_product` — GEGLU's ``a * gelu(gate)``; where ``FUSED_GELU`` says (nowhere by default,
not yet measured), one Triton kernel instead of PyTorch's two passes.

:class:`GroupNorm` — ``nn.GroupNorm`` through :func:`group_norm`, which can also normalise with
statistics recorded on another input. A tiled VAE decode needs it: a tile that shows only flat
background has tiny variances, and normalising it by its own statistics blows its noise up into
visible blotches. Decoding a downscaled copy of the whole latent first and reusing each layer's
statistics on every tile keeps all tiles on the same scale (the idea of the "Tiled VAE" extension
for the A1111 web UI, which computes exact statistics layer by layer; ours are an approximation).

:func:`rowwise` — a per-token layer (the UNet's feed-forward) a few hundred tokens at a time on
the CPU, so its 8x-wide hidden activations stay in cache.

:func:`upsample_conv` — the UNet's and the VAE's ``Upsample``: nearest-neighbour x2, then a 3x3
conv, computed as four 2x2 convs on the small map (one per output pixel parity). The same sums,
with 16 instead of 36 multiply-adds per output pixel and channel pair, and no 4x-sized upsampled
copy of the input.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .devices import cpu_has_fast

log = logging.getLogger("sdlite")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
    """``[B, heads, L, d] x [B, heads, N, d] -> [B, heads, L, d]``; ``query_chunk`` queries at a time if set.

    On an x86 CPU with AVX-512 or AVX2 (``FUSED_ATTENTION``), fp32 or bf16 (bf16 with AVX512-BF16),
    without autograd, outside ``torch.compile`` and for heads it pays on (:func:`sdlite.cpu_kernels.pays`):
    sdlite's C++ kernel (:mod:`sdlite.cpu_kernels`), both products with fp32 sums and the softmax
    in between while its block of scores is in the cache; the same arithmetic as the GEMM path
    below. Per call 1.5-2.4x as fast in fp32 and 2.0-3.1x in bf16 with AVX-512 (session 19); its
    AVX2 build, on a real AVX2 CPU, for heads up to 160 wide (every UNet head: 0.66-0.99x SDPA's
    time there; the VAE's 512-wide head 1.25-1.7x; session 26). Half inputs without native kernels here
    (``HALF_AS_FP32``) run through the fp32 kernel, rounded back once. It never
    holds more than 32 rows of scores per thread, so ``query_chunk`` does not apply.

    Otherwise, on a CPU with AVX-512, attention over at least ``GEMM_ATTENTION_MIN_KEYS`` keys (the
    self-attention of large maps) runs as :func:`_attention_by_gemm`: scores and softmax in fp32,
    half inputs included, and the product of the probabilities with ``v`` in ``v``'s dtype where oneDNN has it
    natively (bf16), else in fp32. For bf16 that is the arithmetic of SDPA's own bf16 kernel (fp32
    scores, probabilities rounded to bf16, fp32 accumulation), with the same mean error against
    fp64 (within 6%; 1.6x that of an fp32 product, which rounds only the result), 1.7-2.5x faster
    than that kernel at 4096 tokens and 0.77-0.91x the time of the fp32 product (session 14
    micro-benchmark; the whole bf16 UNet at 64x64 latents: 0.96x). Everything else goes through
    SDPA, half inputs without native kernels in fp32 (rounded back once)."""
    dtype = _cpu_kernel_dtype(q, k, v)
    if dtype is not None:  # half inputs without native kernels here: in fp32, rounded once
        return cpu_kernels.attention(cpu_kernels.load(), q.to(dtype), k.to(dtype), v.to(dtype)).to(q.dtype)
    if (GEMM_ATTENTION_MIN_KEYS is not None and k.shape[-2] >= GEMM_ATTENTION_MIN_KEYS
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and _onednn_gemm(q, k, v, dtype=torch.float32)):
        pv_dtype = v.dtype if v.dtype in ONEDNN_GEMM else torch.float32
        return _attention_by_gemm(q.float(), k.float(), v.to(pv_dtype), query_chunk).to(q.dtype)
    out_dtype = q.dtype
    if _as_fp32(q):  # half inputs without native kernels here: in fp32, rounded once
        q, k, v = q.float(), k.float(), v.float()
    if not query_chunk or q.shape[-2] <= query_chunk:
        return F.scaled_dot_product_attention(q, k, v).to(out_dtype)
    return torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(query_chunk, dim=-2)],
                     dim=-2).to(out_dtype)


# The device types on which attention runs through sdlite's own C++ kernel (sdlite.cpu_kernels), where
# the CPU has AVX-512 or AVX2 (and AVX512-BF16 for bf16) and a C++ compiler built it. ``()``: nowhere, the
# benchmarks' comparison.
FUSED_ATTENTION: tuple[str, ...] = ("cpu",)


def _cpu_kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype | None:
    """The dtype in which :func:`attention` runs on :mod:`sdlite.cpu_kernels`, or None where it does
    not: :func:`_may_fuse` on ``FUSED_ATTENTION``, tensors the kernel takes, and the kernel built on
    this machine. Half inputs the CPU has no native kernels for (``HALF_AS_FP32``; bf16 without
    AVX512-BF16) run in fp32, as the convolutions and linear layers do."""
    if not _may_fuse(FUSED_ATTENTION, q, k, v) or not cpu_kernels.may_pay():
        return None
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16) and not cpu_kernels.cpu_supported(dtype) and _as_fp32(q):
        dtype = torch.float32
    if not cpu_kernels.supports(q, k, v, dtype):
        return None
    kernel = cpu_kernels.load()
    takes = kernel is not None and dtype in kernel.run and cpu_kernels.pays(kernel, k.shape[-2], k.shape[-1], dtype)
    return dtype if takes else None


# Self-attention with at least this many keys runs as chunked GEMMs on a CPU with AVX-512 (see
# below; measured there). None: never. On a real AVX2 CPU (Zen 3, session 24) SDPA was faster: 448
# against 688 ms at 4096 keys of 40 in fp32, and as fast in bf16 (computed in fp32 there).
GEMM_ATTENTION_MIN_KEYS: int | None = 1024 if torch.backends.cpu.get_cpu_capability() == "AVX512" else None


def _attention_by_gemm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_chunk: int | None) -> torch.Tensor:
    """``softmax(q kᵀ / √d) v`` for one sample, head and chunk of queries at a time (~2^20 scores,
    or ``query_chunk`` queries if that is fewer), both products through oneDNN's GEMM (see
    :func:`linear`); ``q``, ``k`` in fp32, ``v`` in fp32 or bf16 (the probabilities are rounded to
    ``v``'s dtype for the second product).

    PyTorch's fused CPU kernel (flash attention) does its two small products (``d`` = 40 to 160
    columns) with its BLAS; over the 4096 tokens of a 64x64 latent it was 1.5x slower than this
    plain formulation, and 1.8x for the VAE's single 512-wide head (session 11 micro-benchmark;
    ``benchmarks/bench.py --levers`` has the rows). With the chunk of ~2^20 scores (4 MB in fp32) the score matrix stays small and in
    cache; it is the same arithmetic as SDPA's unfused path, up to float rounding. The result is a
    ``[B, heads, L, d]`` view of a ``[B, L, heads, d]`` tensor, which the networks' next step
    (heads back into channels) reads without a copy."""
    b, heads, length, d = q.shape
    n = k.shape[-2]
    chunk = max(128, 2**20 // n)
    chunk = min(chunk, query_chunk) if query_chunk else chunk  # the low-memory chunk is an upper bound
    out = v.new_empty(b, length, heads, d)
    for i in range(b):
        for h in range(heads):
            k_scaled = k[i, h] * d**-0.5  # [N, d]: the 1/√d on the keys, once per head
            v_t = v[i, h].t().contiguous()  # [d, N]: the GEMM's weight layout, for p @ v
            for s in range(0, length, chunk):
                p = _gemm(q[i, h, s:s + chunk], k_scaled, None).softmax(dim=-1)  # [chunk, N], fp32
                out[i, s:s + chunk, h] = _gemm(p.to(v.dtype), v_t, None)
    return out.transpose(1, 2)


# Per-token layers on the CPU run this many rows (tokens) at a time (see :func:`rowwise`).
ROW_CHUNK = 512


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` that treats every row of ``x`` (``[..., C]``, one token per row) on its
    own; on the CPU computed ``ROW_CHUNK`` rows at a time.

    Why: the UNet's feed-forward layer widens each token 8x (4x after its gate). Over the 8192 tokens
    of a batch-2 64x64 latent its hidden activations are 21-84 MB: fresh memory on every call
    (glibc maps allocations over 32 MB anew, and their page faults cost more than the arithmetic)
    and far out of cache. 512 rows at a time keep them at 1-5 MB, reused from call to call: the
    feed-forward layers at the 64x64 and 32x32 levels ran 1.4-1.9x faster in bf16 and fp32
    (session 12 micro-benchmark; the whole-UNet lever is in ``benchmarks/bench.py --levers``).
    The arithmetic per row is unchanged, so the results are identical. On a GPU one call is
    faster (one kernel per op, all rows in parallel); under ``torch.compile`` too, which plans the
    memory of the whole graph itself."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or x.shape[:-1].numel() <= ROW_CHUNK:
        return fn(x)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([fn(r) for r in rows.split(ROW_CHUNK)])
    return out.view(*x.shape[:-1], out.shape[-1])


def add_into(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``, written into ``x`` when no gradient is recorded. For an ``x`` the caller has just
    made (a residual branch's output, a sum it started), which nothing else holds.

    A new tensor of a large map is fresh memory whose page faults cost more than the sum (134 MB for
    the VAE decoder's 512x512 maps in fp32: a 64x64-latent decode took 0.91x the time with its sums
    and swish in place); the numbers are the same. Autograd needs the originals."""
    return x + y if torch.is_grad_enabled() else x.add_(y)


# The half types this CPU has no native kernels for: their convolutions and matmuls run in fp32.
HALF_AS_FP32: frozenset[torch.dtype] = frozenset(
    d for d in (torch.bfloat16, torch.float16) if not cpu_has_fast(d))


def _as_fp32(x: torch.Tensor) -> bool:
    return x.dtype in HALF_AS_FP32 and x.device.type == "cpu"


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


_scratch = threading.local()


def _scratch_buffer(name: str, n: int) -> torch.Tensor:
    """This thread's reused fp32 buffer ``name``, of at least ``n`` elements: it grows to the largest
    size asked and lives as long as its thread (a fresh tensor per call would be a fresh memory
    mapping, whose page faults cost more than its use). Each name is its own buffer, so one user's
    view is never overwritten by another's."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        setattr(_scratch, name, None)  # the old one freed before the new one is made
        with torch.inference_mode(False):  # an ordinary tensor, usable under and outside inference_mode
            buf = torch.empty(n, dtype=torch.float32)
        setattr(_scratch, name, buf)
    return buf


def _fp32_weight(weight: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``weight.float()``, written into one reused buffer per thread when no gradient is recorded
    (``input`` is what the weight multiplies: its gradient would need the weight kept too).

    A fresh fp32 copy of a large weight (up to 118 MB in SD1.5's UNet) is a fresh memory mapping,
    and its page faults cost more than the conversion: 150 ms against 32 ms into a reused buffer for
    a 1280x2560x3x3 weight on this project's machine. The buffer grows to the largest weight seen
    and lives as long as its thread; the view returned is valid until the next call on that thread,
    which is enough: each convolution or matmul consumes it before the next one starts."""
    if torch.is_grad_enabled() and (weight.requires_grad or input.requires_grad):
        return weight.float()  # autograd keeps the fp32 copy for the backward pass
    n = weight.numel()
    return _scratch_buffer("fp32_weight", n)[:n].view(weight.shape).copy_(weight)


# The dtypes whose matrix products on the CPU go through oneDNN's GEMM (see the module docstring):
# fp32, and bf16 where the CPU has native bf16 kernels (elsewhere bf16 is computed in fp32, above),
# on an x86 CPU with a PyTorch build that has oneDNN and its ``_linear_pointwise`` op (the one
# PyTorch's own compiler emits for CPU linear layers). The op is internal to PyTorch, so it is
# tried once on a tiny product at import; a build where it is missing, fails or disagrees with
# ``F.linear`` gets PyTorch's defaults, as do other CPUs.
def _onednn_gemm_works(dtype: torch.dtype) -> bool:
    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()):
        return False
    try:
        x, w, b = (torch.tensor(t, dtype=dtype) for t in ([[1.0, 2.0], [3.0, 4.0]], [[1.0, -1.0]], [0.5]))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.equal(y, torch.tensor([[-0.5], [-0.5]], dtype=dtype)))
    except (AttributeError, RuntimeError, TypeError):
        return False


ONEDNN_GEMM: frozenset[torch.dtype] = frozenset(
    d for d in (torch.float32, torch.bfloat16) if d not in HALF_AS_FP32 and _onednn_gemm_works(d))


def _onednn_gemm(x: torch.Tensor, *params: torch.Tensor | None, dtype: torch.dtype | None = None) -> bool:
    """Whether ``x @ weight.T (+ bias)`` takes oneDNN's GEMM: on the CPU in fp32, or in bf16 where
    the CPU has native bf16 kernels; no gradient to record (the op has no backward: training keeps
    PyTorch's kernels); not under CPU autocast (which casts inside PyTorch's own ops, not this one)
    and not under ``torch.compile``. ``dtype``: the dtype it will compute in, if not ``x``'s."""
    return ((dtype or x.dtype) in ONEDNN_GEMM and x.device.type == "cpu" and x.dim() >= 2
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))))


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by oneDNN (``x``: ``[..., K]``, ``weight``: ``[N, K]``). oneDNN
    reads the bias as contiguous whatever its strides (a strided one gave wrong sums): made so."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, _contiguous(bias), "none", [], "")


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: through oneDNN's GEMM on the CPU (``ONEDNN_GEMM``), and in fp32 for a half input
    on a CPU without native half kernels (see above)."""
    if _as_fp32(x):
        return linear(x.float(), _fp32_weight(weight, x), _fp32(bias)).to(x.dtype)
    if _onednn_gemm(x, weight, bias):
        return _gemm(x, weight, bias)
    return F.linear(x, weight, bias)


class _Packable(nn.Module):
    """The weight-packing half of :class:`Linear` and :class:`Conv2d` (see :func:`pack`).

    A packed layer's ``weight`` is a parameter in oneDNN's opaque blocked layout (same dtype, same
    shape except a 1x1 conv's, packed as the ``[C_out, C_in]`` linear layer it is; no strides, no
    ``data_ptr``). Everything that needs the plain tensor gets it: ``state_dict()`` returns plain
    weights; ``.to()``, ``.float()``, ``.cuda()`` (``_apply``), ``load_state_dict`` and a forward pass
    that oneDNN cannot take (gradients recorded, autocast, ``torch.compile``, another dtype) unpack the
    layer first, for good. What PyTorch cannot do with an opaque tensor fails loudly: ``copy.deepcopy``
    and ``torch.save`` of the module, and changes through ``weight.data``; :func:`unpack` first, or
    change weights with ``load_state_dict``. So does training a packed weight (``requires_grad_(True)``
    on a loaded model): an optimizer would hold the packed tensor, which unpacking replaces;
    :func:`unpack` before making the weights trainable."""

    weight: nn.Parameter
    packable = True  # False: never packed (a layer whose forward slices its weight)

    def _reorder(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def packed(self) -> bool:
        """Whether the layer is packed (see :func:`pack`)."""
        return self.weight.is_mkldnn

    def _can_pack(self) -> bool:
        w = self.weight
        return (self.packable and not self.packed and not w.requires_grad and w.device.type == "cpu"
                and w.dtype in ONEDNN_GEMM)

    def pack(self) -> int:
        """Pack the weight if oneDNN can take it; returns the bytes of the plain weight it replaced (0: left)."""
        if not self._can_pack():
            return 0
        w = self.weight
        self._plain_shape = w.shape  # a 1x1 conv is packed as a 2-D linear weight
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable everywhere
            self.weight = nn.Parameter(self._reorder(w.detach()), requires_grad=False)
        self.__dict__.pop("_phase_cache", None)
        return w.numel() * w.element_size()

    def _plain_weight(self) -> torch.Tensor:
        return self.weight.detach().to_dense().view(self._plain_shape)

    def unpack(self) -> None:
        if self.weight.is_mkldnn:
            with torch.inference_mode(False), torch.no_grad():
                self.weight = nn.Parameter(self._plain_weight(), requires_grad=self.weight.requires_grad)
        # Also where the weight is plain: upsample_conv packs its phase kernels for a packed conv whose
        # own weight it never lays out.
        self.__dict__.pop("_phase_cache", None)

    def _unpack_for_good(self) -> None:
        """For a forward the packed weight cannot serve (gradients, autocast, another dtype). A packed
        weight that requires grad is refused instead: an optimizer built on the model holds that
        tensor, which unpacking replaces, so its steps would update nothing, without an error."""
        if self.weight.is_mkldnn and self.weight.requires_grad:
            raise RuntimeError(f"{type(self).__name__}: its weight is packed for inference (sdlite.load does that "
                               "on the CPU) and cannot be trained; call sdlite.ops.unpack(model) before "
                               "requires_grad_(True) and before building the optimizer")
        self.unpack()

    def _packed_path(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether a forward with ``weight`` packed can run as is; if not, it needs the plain weight."""
        return x.dtype == weight.dtype and _onednn_gemm(x, weight, bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self._plain_weight()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)


class Linear(_Packable, nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) computed by :func:`linear`; its weight
    can be packed (:func:`pack`)."""

    def _reorder(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            if self._packed_path(input, self.weight, self.bias):
                return _gemm(input, self.weight, self.bias)
            self._unpack_for_good()
        return linear(input, self.weight, self.bias)


# Which convolutions with plain weights run as im2col + GEMM (see the module docstring; packed weights,
# what sdlite.load gives on the CPU, take oneDNN's convolution, faster still), per dtype: those with at least
# GEMM_CONV_MIN_OUT output channels and at most ``GEMM_CONV_MAX_ROWS[dtype]`` output positions
# (batch·H·W), or at most ``rows`` positions where the unrolled row is long, ``C_in·kh·kw >= k``
# (``GEMM_CONV_LARGE_K[dtype] = (rows, k)``); dtypes not listed never. At batch 2 that is, for the
# UNet's 1280-channel convs: every conv on 8x8 maps and smaller (the one with 640 input channels
# 1.1x slower so, the others up to 4x faster; and the Upsample's four 2x2 convs on an 8x8 map, 162
# positions), and on 16x16 maps those with at least 1280 (fp32) or 1920 (bf16) input channels x
# 3x3. oneDNN's conv stays faster for 640 output channels, for short rows on 16x16 maps (1x1 convs,
# 640 input channels: 1.07-1.35x slower as a GEMM) and for every larger map. Measured
# per conv on an AVX-512 CPU with native bf16 (session 12), and in fp32 with PyTorch and oneDNN
# limited to AVX2 on the same CPU (session 11; benchmarks/RESULTS.md, "Levers"); other CPU
# families keep PyTorch's default until measured.
_MEASURED_ISA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # where the rule was measured
GEMM_CONV_MAX_ROWS: dict[torch.dtype, int] = {
    d: 256 for d in (torch.float32, torch.bfloat16) if _MEASURED_ISA and d in ONEDNN_GEMM}
GEMM_CONV_LARGE_K: dict[torch.dtype, tuple[int, int]] = {
    d: rule for d, rule in ((torch.float32, (512, 11520)), (torch.bfloat16, (512, 17280)))
    if d in GEMM_CONV_MAX_ROWS}
GEMM_CONV_MIN_OUT = 1280


def _conv_takes_gemm(dtype: torch.dtype, rows: int, k: int) -> bool:
    """The rule above: ``rows`` output positions, rows of length ``k`` = C_in·kh·kw."""
    long_rows, min_k = GEMM_CONV_LARGE_K.get(dtype, (-1, 0))
    return rows <= GEMM_CONV_MAX_ROWS.get(dtype, -1) or (rows <= long_rows and k >= min_k)


def _conv_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]) -> torch.Tensor:
    """A stride-1 convolution as one matrix product: ``[B·H'·W', C·kh·kw] @ weight.view(C_out, C·kh·kw)ᵀ``.

    Row ``(b, i, j)`` of the unrolled input holds ``x_padded[b, c, i + u, j + v]`` in the order
    ``(c, u, v)``, the order in which the weight is stored, so the weight needs no copy."""
    c_out, c_in, kh, kw = weight.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    b, _, hp, wp = xp.shape
    h, w = hp - kh + 1, wp - kw + 1
    sb, sc, sh, sw = xp.stride()
    rows = xp.as_strided((b, h, w, c_in, kh, kw), (sb, sh, sw, sc, sh, sw)).reshape(b * h * w, c_in * kh * kw)
    y = _gemm(rows, weight.reshape(c_out, -1), bias)  # [B·H'·W', C_out]
    return y.view(b, h, w, c_out).permute(0, 3, 1, 2).contiguous()


# The device types whose 3x3 convolutions of large maps run by Winograd's minimal filtering (see
# :func:`winograd_conv3x3`): the CPU where PyTorch's capability is AVX2, where it was measured (a
# Zen 3 EPYC, sessions 25 and 27); elsewhere (AVX-512, not measured with this kernel) oneDNN's direct
# convolution. ``()``: nowhere, the benchmarks' comparison and ``--no-fused-kernels``.
WINOGRAD_CONV: tuple[str, ...] = ("cpu",) if torch.backends.cpu.get_cpu_capability() == "AVX2" else ()
# Which convolutions: fp32, 3x3, stride 1, padding 1, at least WINOGRAD_MIN_CHANNELS input and
# output channels, and by which algorithm: F(m x m, 3x3) for the first m here whose output tiles
# (m x m pixels each, over the batch) number at least its value; none, oneDNN's direct convolution.
# Per conv on that CPU against oneDNN with its weight packed for the shape (session 27, best of 5-7):
# - F(4x4): 0.29-0.53x the time for the UNet's 320- and 640-channel convs at batch 2 on 64x64 and
#   32x32 maps (128-512 tiles of 4x4), 0.48x at batch 1 on 32x32 (64 tiles), 0.37-0.58x for the VAE
#   decoder's (128-512 channels, 64x64 to 512x512 maps). That is 0.52-0.86x F(2x2)'s time.
# - F(2x2), where F(4x4) has fewer tiles: 0.61-0.72x for the 640- to 2560-channel convs on 16x16 maps
#   at batch 2 (128 tiles of 2x2; F(4x4), with 32 tiles: 0.69-0.80x), 0.79x at batch 1 (64 tiles;
#   F(4x4) 1.16x). Slower below: 1.13-1.35x on 8x8 maps at batch 2 (32 tiles); 0.5x for 4 input channels.
WINOGRAD_MIN_TILES: dict[int, int] = {4: 64, 2: 64}
WINOGRAD_MIN_CHANNELS = 64
# Tiles per chunk: enough for the GEMMs to run near full speed, few enough that the chunk's input and
# product in the Winograd domain (n² x tiles x channels each) stay near 16 MB, out of fresh memory.
WINOGRAD_CHUNK_BYTES = 16 * 2**20
WINOGRAD_MIN_CHUNK = 256
# Output channels per block: the kernel's transform, n² x C_in floats per output channel, stays near
# this size. Each further block transforms the input again. Summed over ten UNet and VAE convs
# (session 27): 32 MB 987 ms, 64 MB 918 ms, 128 MB 886 ms; 64 MB of scratch memory, kept.
WINOGRAD_WEIGHT_BYTES = 64 * 2**20


def _winograd_tiles(batch: int, height: int, width: int, m: int) -> int:
    """How many m x m output tiles cover ``batch`` maps of ``height`` x ``width`` (cut at the edges)."""
    return batch * -(-height // m) * -(-width // m)


def winograd_tile(batch: int, height: int, width: int) -> int | None:
    """The side m of the output tiles by which a 3x3 conv on ``batch`` maps of ``height`` x ``width``
    runs (the rule of ``WINOGRAD_MIN_TILES``), or None: too few tiles for either."""
    return next((m for m, least in WINOGRAD_MIN_TILES.items() if _winograd_tiles(batch, height, width, m) >= least),
                None)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int | None = None,
                     scale: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel, in fp32 on the CPU, by Winograd's
    minimal filtering F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
    Networks", 2016), with output tiles of ``tile`` = m = 2 or 4 pixels a side (default: the rule's,
    :func:`winograd_tile`, else 2); the output is channels-last, as a packed conv's. With ``scale=2``,
    the convolution of ``x`` upsampled (nearest x2), read from ``x`` without writing the upsampled
    map out (:func:`upsample_conv`).

    Each m x m block ("tile") of the output depends on an n x n patch ``d`` of the padded input,
    n = m + 2. Taken into an n x n "Winograd domain", the convolution of the patch with a 3x3 kernel
    ``g`` becomes an element-wise product, ``Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`` (matrices in
    ``sdlite/csrc/winograd.cpp``), and summed over input channels each of the n² positions of the
    domain is one matrix product, ``[tiles, C_in] @ [C_in, C_out]``. Per output pixel and channel
    pair that is n²/m² multiply-adds where the direct convolution does 9: 4 for F(2x2, 3x3) (2.25x
    fewer), 2.25 for F(4x4, 3x3) (4x fewer). The transforms are a few additions and multiplications
    per value, in C++ (:mod:`sdlite.cpu_kernels`); the n² products are one batched GEMM (PyTorch's
    BLAS), a chunk of tiles at a time. The kernel's transform is redone on every call (against
    keeping n²/9 of the weights' memory). Rounding, against an fp64 reference: F(2x2, 3x3) is as
    accurate as the direct convolution; F(4x4, 3x3) multiplies by larger coefficients, and its error
    is a few times F(2x2, 3x3)'s but below the direct convolution's (oneDNN's; see the tests).
    """
    kernel = cpu_kernels.load_winograd()
    assert kernel is not None and weight.shape[2:] == (3, 3), "see Conv2d._winograd_tile"
    b, c, h, w = x.shape
    h, w = scale * h, scale * w  # the convolved map
    tile = tile or winograd_tile(b, h, w) or 2
    if tile not in (2, 4):
        raise ValueError(f"Winograd's 3x3 convolution takes output tiles of 2 or 4 pixels a side, not {tile}")
    k = weight.shape[0]
    p = (tile + 2) ** 2  # positions of the Winograd domain
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous()
    tiles = _winograd_tiles(b, h, w, tile)
    chunk = max(1, min(tiles, max(WINOGRAD_MIN_CHUNK, WINOGRAD_CHUNK_BYTES // (4 * p * max(c, k)))))
    # Output channels a block at a time (WINOGRAD_WEIGHT_BYTES).
    block = max(1, min(k, max(WINOGRAD_MIN_CHANNELS, WINOGRAD_WEIGHT_BYTES // (4 * p * c) // 16 * 16)))
    buf = _scratch_buffer("winograd", p * (block * c + chunk * (c + block)))
    y = torch.empty(b, k, h, w, memory_format=torch.channels_last)
    for k0 in range(0, k, block):
        kb = min(block, k - k0)
        u = buf[:p * kb * c].view(p, kb, c)
        kernel.weights(weight[k0:k0 + kb], u)
        u = u.transpose(1, 2)  # [n², C, kb], a view: the GEMMs read it transposed
        bias_block = None if bias is None else bias[k0:k0 + kb].contiguous()
        for t0 in range(0, tiles, chunk):
            n = min(chunk, tiles - t0)
            v = buf[p * block * c:][:p * n * c].view(p, n, c)
            m = buf[p * (block * c + chunk * c):][:p * n * kb].view(p, n, kb)
            kernel.input(x, v, t0, scale)
            torch.bmm(v, u, out=m)
            kernel.output(m, bias_block, y, t0, k0)
    return y


def _reorder_conv(weight: torch.Tensor, padding: Sequence[int], stride: Sequence[int],
                  dilation: Sequence[int], groups: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """A conv weight in the blocked layout oneDNN picks for an input of ``shape`` = (batch,
    height, width). The layout depends on that shape, and a call with an input it was not picked
    for reorders the whole weight first, on every call: :class:`Conv2d` re-packs its weight when
    the input's shape changes (see ``Conv2d._laid_out_for``). 1x1 convs are packed as linear
    layers instead, whose layout does not depend on the input."""
    n, h, w = shape
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, [n, weight.shape[1] * groups, h, w])


class Conv2d(_Packable, nn.Conv2d):
    """``nn.Conv2d`` with the CPU choices above (a packed weight through oneDNN's convolution; half
    inputs in fp32 where the CPU lacks native half kernels; small maps as im2col + oneDNN GEMM);
    everything else is inherited."""

    def _pointwise(self) -> bool:
        """A 1x1 conv: a linear layer applied to every pixel."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.groups == 1)

    def _reorder(self, weight: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        if self._pointwise():  # packed as the linear layer it is (see _reorder_conv)
            return torch.ops.mkldnn._reorder_linear_weight(weight.flatten(1), None)
        return _reorder_conv(weight, self.padding, self.stride, self.dilation, self.groups, shape)

    # While the conv is packed, the input shape (batch, height, width) its weight is laid out for:
    # () until its first call. None: not packed. See _laid_out_for.
    _packed_for: tuple[int, int, int] | tuple[()] | None = None
    # See release_when_laid_out.
    _release_file: Callable[[torch.Tensor], None] | None = None

    @property
    def packed(self) -> bool:
        return self._packed_for is not None

    def pack(self) -> int:
        """A 1x1 conv is packed now, as the linear layer it is: that layout fits every input shape.
        Any other conv keeps its plain weight until its first call, which lays it out for that
        call's input shape (see :meth:`_laid_out_for`): oneDNN's layout depends on that shape, and
        where the conv runs by Winograd it reads the plain weight. Laying it out at load for a guessed
        shape cost the load a reorder of every conv weight, and the first step a second one (SD1.5
        in fp32 on a 2-core AVX2 CPU, session 28: a load from an fp16 file 3.3-5.0 s instead of
        5.5-8.1, the first 64x64 step's extra conv time 0.7 s instead of 2.4)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not self._can_pack():
            return 0
        self._plain_shape = self.weight.shape
        nbytes = super().pack() if self._pointwise() else 0
        self._packed_for = ()
        return nbytes

    def release_when_laid_out(self, release: Callable[[torch.Tensor], None]) -> None:
        """The packed conv's plain weight is a checkpoint file's memory-mapped tensor: once its first
        call lays out a weight of its own, ``release(file_weight)`` drops the file's pages (the
        loader's, :func:`sdlite.checkpoint.load_into`). Until then the weight is read from the file."""
        assert self.packed and not self.weight.is_mkldnn, "only for a packed conv not yet laid out"
        self._release_file = release

    def unpack(self) -> None:
        super().unpack()
        self._packed_for = None
        # Unpacked, the plain weight is the caller's to use (even to change in place, which a
        # private file mapping keeps in memory of its own): its file pages are never dropped.
        self._release_file = None

    def _laid_out_for(self, input: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """The packed conv's weight, laid out again first if it was laid out for another input shape
        (``input``'s, its map upsampled ``scale`` times for :func:`upsample_conv`).

        oneDNN picks a conv's weight layout by the input's batch and map size as well as the
        channels, and with a weight in another layout it reorders the whole weight before every
        call. Where that happens depends on the CPU: on an AVX2 EPYC (Zen 3, session 24) a
        1280-channel 3x3 conv on a 2x2 map took 650-800 ms instead of ~10, and SD1.5's UNet step
        at batch 2 spent 12.4 of its 13.7 s reordering at 16x16 latents, 0.9 of 15.5 s at 64x64.
        The layout oneDNN wants is not predictable from outside (16-, 24- or 32-channel blocks by
        shape, no rule) and a packed tensor does not say which it has, so the weight is laid out at
        the conv's first call and again for each new input shape: once per image size and batch,
        ~0.1 s for the largest conv.
        A network at one size keeps each conv at one shape (tiled VAE decodes use equal tiles).
        For a shape that :func:`winograd_conv3x3` takes, the layout is the plain weight it reads."""
        shape = (input.shape[0], scale * input.shape[-2], scale * input.shape[-1])
        if self._packed_for != shape:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.weight
                plain = self._plain_weight() if weight.is_mkldnn else weight.detach()
                laid = plain if self._winograd_tile(input, plain, scale) else self._reorder(plain, shape)
                if laid is not plain or weight.is_mkldnn:  # a new tensor (a plain weight kept as it is)
                    self.weight = nn.Parameter(laid, requires_grad=False)
                    _RELEASER.replaced(laid.numel() * laid.element_size())
                    release, self._release_file = self._release_file, None
                    if release is not None:  # the file's weight, replaced for good
                        release(weight)
            self._packed_for = shape
        return self.weight

    def _winograd_tile(self, input: torch.Tensor, weight: torch.Tensor, scale: int = 1) -> int | None:
        """The side of the output tiles by which this conv runs ``input`` (its map upsampled ``scale``
        times, for :func:`upsample_conv`) as :func:`winograd_conv3x3`, or None: it does not. See
        ``WINOGRAD_CONV`` and the rule below it; fp32 input and weight (plain or packed: only its
        dtype and shape count), no gradient to record, no autocast, and the kernel built."""
        if not (_may_fuse(WINOGRAD_CONV, input, weight, self.bias) and input.dim() == 4
                and input.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and weight.shape[2:] == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and min(input.shape[1], weight.shape[0]) >= WINOGRAD_MIN_CHANNELS):
            return None
        b, _, h, w = input.shape
        tile = winograd_tile(b, scale * h, scale * w)
        return tile if tile is not None and cpu_kernels.load_winograd() is not None else None

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight is self.weight and self.packed:  # laid out for this input
            if not (self._packed_path(input, weight, bias) and input.dim() == 4) or weight.requires_grad:
                self._unpack_for_good()  # (gradients, autocast, torch.compile, another dtype; a trainable weight)
            elif not self._pointwise():  # (a 1x1 conv's layout, a linear layer's, fits every shape)
                self._laid_out_for(input)
            weight = self.weight
        if weight.is_mkldnn:  # self.weight, or upsample_conv's phase kernels packed with it
            if self._packed_path(input, weight, bias) and input.dim() == 4:
                if weight.dim() == 2:  # a packed 1x1 conv: [B, H, W, C_in] @ weightᵀ, channels-last out
                    return _gemm(input.permute(0, 2, 3, 1).contiguous(), weight, bias).permute(0, 3, 1, 2)
                return torch.ops.mkldnn._convolution_pointwise(  # (a strided bias read as contiguous: see _gemm)
                    input, weight, _contiguous(bias), list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, "none", [], "")
            weight = weight.to_dense()
        if _as_fp32(input):
            return self._conv_forward(input.float(), _fp32_weight(weight, input), _fp32(bias)).to(input.dtype)
        tile = self._winograd_tile(input, weight)
        if tile:
            return winograd_conv3x3(input, weight, bias, tile)
        # ``weight`` may differ from self.weight (upsample_conv passes its 2x2 phase kernels).
        c_out, c_in, kh, kw = weight.shape
        if (input.dim() == 4 and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and c_out >= GEMM_CONV_MIN_OUT
                and _onednn_gemm(input, weight, bias)):
            h, w = (input.shape[-2] + 2 * self.padding[0] - kh + 1, input.shape[-1] + 2 * self.padding[1] - kw + 1)
            if _conv_takes_gemm(input.dtype, input.shape[0] * h * w, c_in * kh * kw):
                return _conv_as_gemm(input, weight, bias, self.padding)
        return super()._conv_forward(input, weight, bias)


def pack(module: nn.Module) -> nn.Module:
    """Store the weights of ``module``'s :class:`Linear` and :class:`Conv2d` layers in oneDNN's
    blocked layout, for inference on the CPU; returns ``module``. Done by :func:`sdlite.load`.

    oneDNN computes in a blocked weight layout of its own. Given a plain weight it reorders it into
    that layout on every call: a full read and write of the weight before any arithmetic, which on
    the low-resolution levels of the UNet (1280 channels, small maps) costs as much as the product.
    A packed weight is reordered once, in place of the plain one (no extra memory). A conv's layout
    depends on its input's shape too, so a conv (other than 1x1) is laid out at its first call, and
    again when that shape changes (``Conv2d._laid_out_for``: once per image size and batch, ~2-4 s
    for SD1.5's fp32 UNet on a 2-core AVX2 CPU, where the reorders had cost 0.1-11 s per step, by
    latent size); one that runs by Winograd keeps its plain weight. Per layer:
    linear layers 0.74-0.97x the time, the 3x3 convs of 16x16 and smaller maps 0.28-0.85x (also
    faster than the im2col GEMM of :class:`Conv2d`, which they replace, on AVX-512 and AVX2); the whole
    SD1.5 UNet (batch 2) 0.83x (32x32 latent) and 0.89x (64x64) in fp32, 0.86x and 0.91x in bf16,
    the VAE decoder 0.96x (session 13, two copies of a network alternating in one process;
    ``benchmarks/bench.py --levers`` has the rows). A packed
    convolution writes its output channels-last whatever the layout of its input, so the networks
    run channels-last from their first conv on; the results are the same sums in another order
    (float rounding: 1 ulp in ~0.1% of a bf16 conv's outputs, as accurate against fp64).

    Only what oneDNN can take is packed: weights on the CPU in fp32, or bf16 where the CPU has
    native bf16 kernels, that need no gradient (a model being trained is never packed), in modules
    that allow it (``packable``). See :class:`_Packable` for how a packed layer unpacks itself.

    Memory: each packed weight is a new allocation, and the plain one it replaces is freed into the
    middle of the heap, where glibc's allocator keeps it resident (the packed weights did not reuse
    those blocks). Packing SD1.5 after loading it raised the load's peak RSS from 1.15x to 1.67x the
    weights in bf16, 1.08x to 1.26x in fp32 (session 14). So the freed pages are handed back to the
    system every ``RELEASE_EVERY`` bytes replaced (:class:`Packer`, :func:`release_free_memory`)."""
    packer = Packer()
    for m in module.modules():
        packer(m)
    packer.close()
    return module


class Packer:
    """:func:`pack`, one layer at a time: ``packer(layer)`` packs ``layer`` alone (not its
    children), and the memory freed is given back to the system after every ``RELEASE_EVERY`` bytes
    of plain weights replaced and at :meth:`close`. :func:`sdlite.load` packs each layer as soon as
    its weights are read (:func:`sdlite.checkpoint.load_into`): the next layer's plain weights then
    reuse the memory just freed, where packing after the whole load touched fresh pages for both."""

    def __init__(self) -> None:
        self.since_release = 0  # bytes of weights replaced since the last release

    def __call__(self, layer: nn.Module) -> None:
        if isinstance(layer, _Packable):
            self.replaced(layer.pack())

    def replaced(self, nbytes: int) -> None:
        """``nbytes`` of weights were replaced by new allocations."""
        self.since_release += nbytes
        if self.since_release >= RELEASE_EVERY:
            self.close()

    def close(self) -> None:
        if self.since_release:
            release_free_memory()
            self.since_release = 0


# Conv2d's re-packing for a new input shape (_laid_out_for) frees memory the same way.
_RELEASER = Packer()


# :class:`Packer` gives freed memory back to the system after replacing this many bytes of weights.
# Each release also gives back blocks the next layers would have reused; for SD1.5 loaded from an
# fp16 file, every 256 MB held the load's peak RSS at 1.16x the weights (bf16; 1.08x fp32), where
# every 16 MB took 0.2-0.5 s more and never releasing let it grow to 1.30x (session 15).
RELEASE_EVERY = 256 * 2**20


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such symbol; no C library by that name (Windows)
        return None


_MALLOC_TRIM = _find_malloc_trim()  # glibc's, or None


def release_free_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim``); a no-op where
    the C library has no such call. Freed blocks in the middle of the heap otherwise stay resident."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def unpack(module: nn.Module) -> nn.Module:
    """Undo :func:`pack`: plain weights again in every layer of ``module``; returns ``module``."""
    for m in module.modules():
        if isinstance(m, _Packable):
            m.unpack()
    return module


# The device types on which sdlite's own Triton kernels (sdlite.kernels) replace PyTorch's ops, where
# Triton is installed: group_norm (+ SiLU) and the GELU product of GEGLU. ``()``: nowhere, the
# benchmarks' comparison.
FUSED_GROUP_NORM: tuple[str, ...] = ("cuda",)
# Off until measured: the GELU kernel was written and tested (under Triton's interpreter) in a session
# without a GPU; ``benchmarks/bench_cuda.py`` has its levers. ``("cuda",)`` turns it on.
FUSED_GELU: tuple[str, ...] = ()


@functools.cache
def _fused_kernels(kernel: str, device: torch.device, dtype: torch.dtype) -> Any:
    """:mod:`sdlite.kernels` once its ``kernel`` (``"group_norm"`` or ``"gelu_product"``) has built
    and run on ``device`` for ``dtype`` tensors, else None: Triton missing (it comes with PyTorch's
    CUDA wheels on Linux) or unable to build (it needs a C compiler, and a GPU it supports for that
    dtype: bf16 needs a recent one), in which case PyTorch's ops run instead, with a warning."""
    try:
        from . import kernels
    except ImportError:
        return None
    # Said because the first generation on a machine waits while Triton builds the variants (6.8-8.1 s
    # for SD1.5 at 512x512 on H100/H200 hosts, benchmarks/RESULTS-cuda-kernels.md; ~0.5 s from its cache).
    log.info("building sdlite's %s kernels for %s on %s (the first time on a machine Triton compiles "
             "them, ~10 s; later from its cache)", kernel, dtype, device)
    try:
        x = torch.arange(4, device=device, dtype=dtype).reshape(1, 2, 1, 2)
        if kernel == "group_norm":
            kernels.group_norm(x, 1, x.new_ones(2), x.new_zeros(2), 1e-5, silu=True)
        else:
            kernels.gelu_product_(x.clone(), x)
    except Exception as e:  # noqa: BLE001 - any build or launch failure: fall back, once
        warnings.warn(f"sdlite's fused {kernel} kernels do not run here for {dtype} ({type(e).__name__}: "
                      f"{e}); using PyTorch's ops", RuntimeWarning, stacklevel=3)
        return None
    return kernels


def _may_fuse(devices: tuple[str, ...], *tensors: torch.Tensor | None) -> bool:
    """Whether one of sdlite's own kernels may take these tensors: the first one's device type in
    ``devices``, no gradient to record (the kernels have no backward), not inside ``torch.compile``
    (which fuses such ops itself)."""
    return (tensors[0].device.type in devices and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)))


def _takes_fused(kernel: str, devices: tuple[str, ...], *tensors: torch.Tensor | None) -> Any:
    """:mod:`sdlite.kernels` if ``kernel`` runs on these tensors (:func:`_may_fuse`), else None."""
    x = tensors[0]
    return _fused_kernels(kernel, x.device, x.dtype) if _may_fuse(devices, *tensors) else None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """``F.group_norm``, then ``F.silu`` if ``silu``: a new tensor in ``x``'s dtype and layout.

    Statistics in fp32 for any input dtype; weights of another dtype than ``x`` (fp32 with a half
    map, or the reverse) are applied in fp32. On CUDA (``FUSED_GROUP_NORM``), without autograd and
    outside ``torch.compile`` (which fuses this itself), one pass for the statistics and one for
    normalise + SiLU, in the map's own layout (:mod:`sdlite.kernels` says why).

    >>> h = group_norm(x, 32, norm.weight, norm.bias, 1e-5, silu=True)  # doctest: +SKIP
    >>> # h == F.silu(norm(x)) for norm = nn.GroupNorm(32, C)
    """
    kernels = _takes_fused("group_norm", FUSED_GROUP_NORM, x, weight, bias)
    if kernels is not None and kernels.supports(x):
        if weight is None:
            weight = torch.ones(x.shape[1], device=x.device)
        if bias is None:
            bias = torch.zeros(x.shape[1], device=x.device)
        return kernels.group_norm(x, num_groups, weight, bias, eps, silu)
    x = _centred_groups(x, num_groups)
    if weight is not None and weight.dtype != x.dtype:
        # Mixed dtypes: PyTorch's kernels want one; normalise in fp32 and round once.
        y = F.group_norm(x.float(), num_groups, weight.float(), None if bias is None else bias.float(), eps)
        y = y.to(x.dtype)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=not y.requires_grad) if silu else y


# Where a group's mean is more than this many standard deviations from 0, :func:`_centred_groups` shifts it;
# it looks only at groups of at least GROUP_NORM_SHIFT_MIN values.
GROUP_NORM_SHIFT_RATIO = 4.0
GROUP_NORM_SHIFT_MIN = 16384


def _centred_groups(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``x`` as given, or minus an estimate of each group's mean where that mean is large next to the
    group's spread; group norm's output is the same either way (a constant per group cancels).

    Why: PyTorch's CPU group norm reads a channels-last map (what oneDNN's convolutions return) in
    one pass, as sums of x and x², and takes the variance as E[x²] − E[x]²: where the mean is large
    next to the spread, the two nearly cancel in fp32 (a 128-channel 512x512 map of mean 20 and spread
    0.5: errors of 7-8e-2 against 7e-6 for the same map in NCHW; sdlite's VAE decode 8.4e-5 against
    1.5e-6 next to fp64, session 30). Shifted by the mean, the sums are small and nothing cancels. The mean and
    spread are estimated on every 8th row and column, ~1/64 of the map; the shift costs one pass over
    the map (~the group norm's own time), so only groups that need it get it.

    The estimate itself costs ~0.2 ms a call, which is more than a small map's group norm: on the
    bundled model's UNet (maps of 16x16 and less) it made a batch of 8 1.26x as slow. PyTorch's error
    grows with the group's size (a 512x512 map of mean 20 and spread 0.5: 8e-2; 64x64: 5e-3; 8x8 with
    40 channels a group: 1.4e-3), so groups under GROUP_NORM_SHIFT_MIN values are left as they are:
    SD's UNet is checked on its 64x64 and 32x32 levels, its VAE everywhere."""
    if not (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] % num_groups == 0 and x.numel()
            and x.numel() // (x.shape[0] * num_groups) >= GROUP_NORM_SHIFT_MIN
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    b, c, h, w = x.shape
    step = max(1, min(h, w) // 8)
    # [B, positions, G, C/G]: a view of the channels-last map where step is 1. (torch.std_mean here
    # took 0.75 ms a call on 1280-channel 8x8 maps, more than the group norm; this takes 0.2.)
    sample = x[:, :, ::step, ::step].permute(0, 2, 3, 1).float().reshape(b, -1, num_groups, c // num_groups)
    mean = sample.mean(dim=(1, 3))  # [B, G]
    var = (sample - mean[:, None, :, None]).square().mean(dim=(1, 3))
    if not bool((mean.square() > GROUP_NORM_SHIFT_RATIO**2 * var).any()):
        return x
    shift = mean.repeat_interleave(c // num_groups, 1).reshape(b, c, 1, 1).to(x.dtype)
    return x - shift


def gelu_product(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``a * F.gelu(gate)``, GEGLU's gate (exact GELU), for two tensors the caller has just made
    (the halves of a linear layer's output): without autograd the result is written into one of them.

    On the device types in ``FUSED_GELU`` (none by default, see there), without autograd and outside
    ``torch.compile``, one kernel that reads both once and writes once, in fp32 arithmetic
    (:mod:`sdlite.kernels`); elsewhere ``F.gelu``, then the product."""
    kernels = _takes_fused("gelu_product", FUSED_GELU, a, gate)
    if kernels is not None and kernels.supports_gelu_product(a, gate):
        return kernels.gelu_product_(a, gate)
    gate = F.gelu(gate)
    return gate * a if gate.requires_grad or a.requires_grad else gate.mul_(a)


# Per thread, inside shared_statistics: {GroupNorm: its _TiledState}. Per thread, because a tiled
# decode on one thread must not change how the same VAE normalises another thread's decode.
_SHARED_STATISTICS = threading.local()


class _TiledState:
    mode: str = "record"
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` through :func:`group_norm` (``norm(x, silu=True)`` = ``F.silu(norm(x))``),
    plus, for tiled decoding on the calling thread, the modes of :func:`shared_statistics`:
    ``"record"`` (normalise as usual and keep the per-sample, per-group mean and variance) or
    ``"reuse"`` (normalise with the kept ones)."""

    def _tiled_state(self) -> _TiledState | None:
        """This thread's :func:`shared_statistics` state for this norm, or None: normal."""
        return getattr(_SHARED_STATISTICS, "norms", {}).get(self)

    @property
    def stats(self) -> str | None:
        """This thread's mode: None (normal), ``"record"`` or ``"reuse"``."""
        state = self._tiled_state()
        return None if state is None else state.mode

    @property
    def recorded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        state = self._tiled_state()
        return None if state is None else state.recorded

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        state = self._tiled_state()
        if state is None:
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu)
        y = self._tiled_forward(x, state)
        return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y

    def _tiled_forward(self, x: torch.Tensor, state: _TiledState) -> torch.Tensor:
        b, c, g = x.shape[0], x.shape[1], self.num_groups
        if state.mode == "record":
            grouped = x.float().reshape(b, g, -1)
            state.recorded = (grouped.mean(-1), grouped.var(-1, unbiased=False))  # [B, G] each, fp32
        assert state.recorded is not None, "record the statistics first"
        # Normalising with given statistics, per sample and channel, is what an eval-mode batch
        # norm does per channel: with the samples folded into the channels, one native pass over x
        # (a tile of a 2048x2048 decode has 512x512 maps: each extra elementwise pass costs more
        # than the statistics). The statistics and affine parameters stay fp32 for a half x.
        mean, var = (t.repeat_interleave(c // g, dim=1).reshape(b * c) for t in state.recorded)
        weight = self.weight.float().repeat(b) if self.affine else None
        bias = self.bias.float().repeat(b) if self.affine else None
        y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean, var, weight, bias, False, 0.0, self.eps)
        return y.view(x.shape)


@contextlib.contextmanager
def shared_statistics(module: nn.Module) -> Iterator[Callable[[str], None]]:
    """Inside, on the calling thread, ``set_mode("record")`` makes every :class:`GroupNorm` in
    ``module`` keep its statistics and ``set_mode("reuse")`` normalises with them; on exit everything
    is back to normal. Other threads using the same modules meanwhile normalise as usual."""
    norms = getattr(_SHARED_STATISTICS, "norms", None)
    if norms is None:
        norms = _SHARED_STATISTICS.norms = {}
    mine = [m for m in module.modules() if isinstance(m, GroupNorm)]
    if any(m in norms for m in mine):
        raise RuntimeError("shared_statistics is already active for these modules on this thread")

    def set_mode(mode: str) -> None:
        for m in mine:
            norms.setdefault(m, _TiledState()).mode = mode

    try:
        yield set_mode
    finally:
        for m in mine:
            norms.pop(m, None)


# The device types on which the x2 upsampling + 3x3 conv of both networks runs as four 2x2 convs
# on the small map; elsewhere it runs as written in the original code, on the upsampled map (``()``:
# everywhere, the benchmark's comparison). CPU only: on an H100 in fp16 it measured no faster (the
# UNet 0.97-0.99x, the VAE 1.02x with it off, benchmarks/RESULTS-cuda.md "Levers"), and its cached
# kernels would hold ~137 MB of GPU memory for an fp16 SD1 model.
UPSAMPLE_BY_PHASES: tuple[str, ...] = ("cpu",)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, cache: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 conv.

    Output row ``2i + a`` (``a`` = 0 or 1) of the upsampled map reads upsampled rows ``2i + a - 1``,
    ``2i + a``, ``2i + a + 1`` with kernel rows ``w[0], w[1], w[2]``. Nearest-neighbour upsampling
    makes upsampled row ``r`` a copy of small row ``r // 2``, so::

        a = 0:  small rows i-1, i    with kernel rows  w[0],        w[1] + w[2]
        a = 1:  small rows i,   i+1  with kernel rows  w[0] + w[1], w[2]

    and the same for columns. Each of the four output parities ``(a, b)`` is therefore a 2x2 conv of
    the *small* map with summed kernel taps: 4 taps instead of 9 on a map 4x smaller per parity,
    2.25x fewer multiply-adds in all (measured on the whole fp32 networks: a VAE decode 1.18x faster,
    the UNet 1.04x at 32x32 latents and level at 64x64, where these convs are a small share:
    benchmarks/RESULTS.md, "Levers"). The zero border of the upsampled map is the
    small map's zero border, so the result is the same convolution; only the rounding of the summed
    taps differs (~1e-6 relative in fp32).

    The four parities run as one conv with 4x the output channels and the conv's own ``padding=1``:
    output position ``j`` then covers small rows ``j-1, j``, so parity ``a`` is the output shifted by ``a``.
    The summed kernels are cached on ``conv`` for inference (recomputed when its weight changes;
    1.8x the conv's weight in memory). They are recomputed on every call where gradients flow through
    the weight, and with ``cache=False`` (the low-memory option; any cached copy is dropped).

    Only on the device types in ``UPSAMPLE_BY_PHASES`` (the CPU); elsewhere, under
    ``torch.compile``, and where the conv on the upsampled map runs by Winograd's F(4x4, 3x3) (fewer
    multiply-adds again: see below), the original formulation runs.
    """
    if x.device.type not in UPSAMPLE_BY_PHASES or torch.compiler.is_compiling():
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    if isinstance(conv, Conv2d) and conv._winograd_tile(x, conv.weight, scale=2) == 4:
        # Winograd's F(4x4, 3x3) on the upsampled map does 9 multiply-adds per small-map pixel and
        # channel pair where the four phases do 16. Per upsample on an AVX2 EPYC: 0.72-0.89x the time
        # at the UNet's and the VAE's shapes with the upsampled map written out; its transform reads
        # x instead. (F(2x2, 3x3) does 16 as well, 1.06x the time: there the phases stay.)
        weight = conv._laid_out_for(x, scale=2) if conv.packed else conv.weight
        return winograd_conv3x3(x, weight, conv.bias, 4, scale=2)
    if (isinstance(conv, Conv2d) and _as_fp32(x) and conv.weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))):
        # Half weights on a CPU without native half kernels compute in fp32 (see _as_fp32), so the
        # same F(4x4) choice holds for them: their convs take it through Conv2d._conv_forward. (Where
        # it does not apply, the two fp32 copies are dropped: small next to the phases' own work.)
        x32, w32 = x.float(), _fp32_weight(conv.weight, x)
        if conv._winograd_tile(x32, w32, scale=2) == 4:
            return winograd_conv3x3(x32, w32, _fp32(conv.bias), 4, scale=2).to(x.dtype)
    assert (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.padding_mode == "zeros" and conv.groups == 1 and conv.dilation == (1, 1)), conv
    b, _, h, w = x.shape
    weight, bias = _phase_kernels(conv, cache, (b, h, w))
    y = conv._conv_forward(x, weight, bias)  # [B, 4 * C_out, H + 1, W + 1], parities (a, b) in row-major order
    c = y.shape[1] // 4
    # [B, C, H, a, W, b] is [B, C, 2H, 2W] with row 2i + a, column 2j + b; in y's memory layout
    # (channels-last from a packed conv). The result is allocated as [B, C, 2H, 2W] and written
    # through a 6-d view of it: a view the other way round would give a batch of one a stride that
    # PyTorch does not recognise as channels-last, and the next GroupNorm and conv would each copy
    # the map to NCHW (15% of a VAE decode at 512x512; session 20).
    channels_last = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    if channels_last:
        out = torch.empty(b, c, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        phases = out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, c).permute(0, 5, 1, 2, 3, 4)
    else:
        out = y.new_empty(b, c, 2 * h, 2 * w)
        phases = out.view(b, c, h, 2, w, 2)
    for pa in range(2):
        for pb in range(2):
            k = 2 * pa + pb
            phases[:, :, :, pa, :, pb] = y[:, k * c:(k + 1) * c, pa:pa + h, pb:pb + w]
    return out


def _phase_kernels(conv: nn.Conv2d, cache: bool,
                   shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The four 2x2 kernels of :func:`upsample_conv`, stacked: ``[4 * C_out, C_in, 2, 2]``, and the
    bias x4; packed for an input of ``shape`` = (batch, height, width) where ``conv`` is packed."""
    weight, bias = conv.weight, conv.bias
    # A packed conv's weight is plain until its first call, and while it is laid out for a shape
    # that Winograd takes; its phase kernels are packed all the same.
    packed = isinstance(conv, _Packable) and conv.packed
    if not cache:
        conv.__dict__.pop("_phase_cache", None)
    training = torch.is_grad_enabled() and any(p.requires_grad for p in conv.parameters(recurse=False))
    if not cache or training:
        return _sum_taps(conv._plain_weight() if weight.is_mkldnn else weight), None if bias is None else bias.repeat(4)
    # The kernels are computed again when the weight or bias may have changed (summing them costs ~8x a
    # cached call). A weight in oneDNN's layout has no data pointer: its identity and version stand in
    # (packing or unpacking the conv drops this cache; a change through .data raises on it). A plain
    # weight, also in a packed conv (plain until laid out), can change in place, and through .data (an
    # EMA swap, a LoRA merged in place) without moving its version counter: its sums per output channel
    # and kernel tap, one pass over it, see that (also a flipped or transposed kernel); so does a copy of
    # the bias. Packed kernels are laid out for the input's
    # shape too.
    source = (id(weight), weight._version) if weight.is_mkldnn else (weight.data_ptr(), weight._version)
    key = (source, shape if packed else None, weight.dtype, weight.device)
    stamp = None if weight.is_mkldnn else weight.detach().sum(1)  # [C_out, 3, 3]: per output channel and tap
    bias_now = None if bias is None else bias.detach()
    cached = getattr(conv, "_phase_cache", None)
    if not (cached is not None and cached[0] == key and _same(cached[1], stamp) and _same(cached[2], bias_now)):
        # Ordinary tensors even under torch.inference_mode, so a later call with autograd on can use them.
        with torch.inference_mode(False), torch.no_grad():
            kernels = _sum_taps(conv._plain_weight() if weight.is_mkldnn else weight)
            if packed:  # packed like the conv (same padding and stride), for this input shape
                kernels = conv._reorder(kernels, shape)
            cached = (key, stamp, None if bias_now is None else bias_now.clone(), kernels,
                      None if bias is None else bias.repeat(4))
        conv._phase_cache = cached
    return cached[3], cached[4]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


# Which kernel taps each parity sums, per axis: parity 0 takes (w[0], w[1] + w[2]), parity 1 (w[0] + w[1], w[2]).
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # [parity, 2 taps, 3 taps]


def _sum_taps(weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, 3, 3] -> [4 * C_out, C_in, 2, 2]``: ``P[a] w P[b]ᵀ`` for each parity pair ``(a, b)``."""
    # Summed in fp32 and rounded once: half weights lose no more than one rounding (and a half
    # einsum would take the slow reference kernels on CPUs without native half arithmetic).
    acc = torch.promote_types(weight.dtype, torch.float32)
    p = _PHASE_TAPS.to(weight.device, acc)
    taps = torch.einsum("ayk,oikl,bxl->aboiyx", p, weight.to(acc), p).to(weight.dtype)
    return taps.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)
