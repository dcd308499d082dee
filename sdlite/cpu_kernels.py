"""sdlite's own CPU kernel: attention on x86 CPUs, in fp32 with AVX-512 or AVX2, and in bf16 where
the CPU has AVX512-BF16, in C++ (``sdlite/csrc/attention.cpp``), built with the machine's C++
compiler the first time it is needed and loaded with :mod:`ctypes`. :func:`sdlite.ops.attention` calls
:func:`attention`. The same machinery builds and loads sdlite's other CPU kernel, the transforms of
Winograd's 3x3 convolution (``sdlite/csrc/winograd.cpp``, :func:`load_winograd`, :class:`Winograd`),
which :func:`sdlite.ops.winograd_conv3x3` uses on AVX2 CPUs; what follows is about attention, and
holds for both where it is about building (the cache, the compiler, OpenMP).

Why a kernel of our own. With bf16 weights, attention is the one part of the UNet that PyTorch
cannot run at bf16 speed on a CPU. Its scores ``q kᵀ`` must stay in fp32 (rounded to bf16 they
would move the softmax), and PyTorch's CPU GEMMs either round their output to the input's dtype
or take fp32 inputs at half the speed; its fused attention kernel works on blocks too small for
its BLAS. So sdlite computed the scores as an fp32 GEMM, then the softmax and the rounding to bf16
as passes of their own: at a 64x64 latent the UNet's self-attention was a third of a bf16 step, and
the step sat at 66% of the machine's bf16 matmul peak. The AVX512-BF16 instruction ``vdpbf16ps``
multiplies bf16 pairs into fp32 sums: both products of attention at bf16 speed with fp32 sums, and
softmax in the same pass, while one block of scores is in the cache. One self-attention of a
64x64 latent (batch 2, 8 heads of 40, 4096 tokens) took 67-70 ms against 155-175 ms for the GEMM
path, the cross-attention 3.0 against 9.3 ms, the VAE's 512-wide head 45 against 70 ms (session 19
micro-benchmark; benchmarks/RESULTS.md has the whole UNet).

In fp32 the same fusion pays less but still pays: the GEMM path wrote each block of scores out and
read it back for the softmax and for the second product. With the kernel's FMA loops in their place
one self-attention of a 64x64 latent took 122 against 208-214 ms, the cross-attention 3.5 against
8.6 ms (SDPA), 1024 tokens of 80 channels 13.4 against 19.7 ms (session 19).

Most laptop and desktop CPUs have AVX2 but not AVX-512. For them the same source builds with
256-bit vectors (fp32 only; bf16 inputs there run in fp32, as their matmuls do): on this project's
CPU with PyTorch, oneDNN and MKL restricted to AVX2, one self-attention of a 64x64 latent took 262
against 329 ms for the GEMM path, the cross-attention 5.4 against 7.6 ms, 1024 tokens of 80
channels 28 against 32 ms (session 20). All of these were measured on this project's AMD EPYC
(2 cores); Intel's CPUs run the same instructions but were not measured.

The arithmetic is the same as the GEMM path's and PyTorch's own kernels: sums in fp32 (for bf16,
of exact products of bf16 numbers), softmax in fp32, for bf16 the probabilities rounded to bf16
for their product with ``v``, and the output rounded once. In bf16 its error against an fp64
reference is slightly lower than the GEMM path's (the division by the row sum comes after the
product, in fp32), in fp32 about the same (the order of the sums differs); the tests hold it to
the GEMM path's error. Each output row is computed by one thread in a fixed order: results do
not depend on the thread count.

Building. The first call on a machine compiles the kernel (under a second) into
``$SDLITE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/sdlite``, else ``~/.cache/sdlite``), named by a
hash of the source, the flags and the compiler, so a changed source or compiler builds anew and
nothing stale is loaded. It needs a C++ compiler (``$CXX``, else ``c++``) with OpenMP: the
``g++`` of any Linux distribution. A compiler too old for AVX512-BF16 (GCC < 10) builds the AVX-512
kernel without bf16 (bf16 attention then takes PyTorch's ops); where the AVX-512 build fails, the
AVX2 one is tried, with a warning, unless the cause is one every build meets (no compiler, its
OpenMP headers or runtime, the cache folder: ``KernelUnavailable.every_build``). Without a compiler, or where no build succeeds, :func:`load`
returns None, says why once (a warning), and attention runs through PyTorch's ops as before; on a
CPU without AVX2, and outside Linux, it is never built. The cache holds code that sdlite loads into
its process, so it must be the user's own: sdlite creates it writable by its owner only, and refuses
(with a warning, falling back to PyTorch's ops) a folder or library owned by another user or
writable by every user, where anyone could have put a library of that name.

Threads. The kernel runs on PyTorch's own OpenMP threads (``torch.get_num_threads()`` of them), so it
is linked against the OpenMP runtime PyTorch has loaded, found among the libraries mapped into the
process (:func:`openmp_runtime`): GNU's libgomp in PyTorch's pip wheels (under ``torch/lib``, with a
hashed name in some versions), Intel's libiomp5 in conda's MKL builds, LLVM's libomp in others. A
kernel linked against the compiler's default runtime instead would bring a second one into such a
process, with a thread pool of its own: the two pools spin-wait on the same cores after each
parallel region, and a whole fp32 UNet step at 32x32 latents took 1.44 s against 0.88 s (1.6-1.7x in
two runs), slower than without the kernel (0.93 s; this project's 2 cores, PyTorch on libgomp, the
kernel on Intel's libiomp5: benchmarks/RESULTS-openmp-runtime.md, session 21). g++'s
OpenMP code calls libgomp's entry points, which the other two runtimes also provide; clang's calls
LLVM's, which libgomp lacks, so a clang-built kernel fails to link in a process on libgomp and
attention takes PyTorch's ops (a warning says why; ``CXX=g++`` builds it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from .devices import cpu_has_native_bf16

log = logging.getLogger("sdlite")

SOURCE = Path(__file__).parent / "csrc" / "attention.cpp"
# sdlite's other CPU kernel, the transforms of Winograd's 3x3 convolution (sdlite.ops.winograd_conv3x3),
# built and loaded the same way (:func:`load_winograd`).
WINOGRAD_SOURCE = Path(__file__).parent / "csrc" / "winograd.cpp"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fopenmp")  # compiling; linking is ``build``'s
# The kernel is built once per instruction set, by PyTorch's name of the CPU's capability: the
# 512-bit kernel (fp32 and bf16) on AVX-512 CPUs, the 256-bit one (fp32) on AVX2 CPUs (most laptops
# and desktops: Intel's client CPUs since 2013, AMD's since 2017).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
}
_ISAS_OF_CAPABILITY = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}
# Flags left out where the compiler does not know them (GCC < 10, clang < 9: Ubuntu 20.04's g++ 9):
# the AVX-512 build then has fp32 only, and bf16 attention takes the GEMM path.
OPTIONAL_FLAGS = ("-mavx512bf16",)
# Queries per task, per build: the scores (fp32) and probabilities of a block of keys stay in a
# core's L2 cache. 16 to 128 took the same time at 4096 tokens (AVX-512, session 19; AVX2, 32 or 96:
# session 26).
QUERY_BLOCK: dict[str, int] = {"avx512": 32, "avx2": 32}
# Keys per block, per build (0: all N keys in one block, no rescaling). The AVX-512 build was measured
# on a 2 MB L2, where 32 rows of 4096 scores and probabilities (1 MB) fit: one block. The Zen 3
# EPYC's L2 is 512 KB: blocks of 512 keys (online softmax) took its AVX2 build from 588 to 404-426 ms
# at 4096 keys of 40 (256 keys: 425; session 26 micro-benchmark, fp32).
KEY_BLOCK: dict[str, int] = {"avx512": 0, "avx2": 512}
# Every task reads its head's packed keys and values whole, from the shared L3 cache while they fit
# there. The VAE's single 512-wide head (4 bytes per key and channel packed in bf16, 8 in fp32)
# outgrows it on large images. Against the GEMM path, on this project's 32 MB L3 (session 19): in
# bf16 1.5x as fast at 4096 tokens (8 MB), 1.7x at 6400 (12.5 MB), 1.06x at 9216 (18 MB), 0.65x at
# 12544 (24.5 MB); in fp32, which does half the arithmetic per byte read, 1.26x at 1024 tokens
# (4.1 MB), 1.02x at 2304 (9.0 MB), 0.94x at 3136 (12.3 MB), 0.58x at 4096 (16.1 MB). Larger heads
# take the GEMM path.
MAX_PACKED_HEAD_BYTES: dict[torch.dtype, int] = {torch.bfloat16: 16 * 2**20, torch.float32: 8 * 2**20}
# The widest head a build pays for, where there is a limit. The AVX2 build (6 query rows per register
# tile of 16 keys, against 8 of 48 in the AVX-512 build) reads more per product. On the AVX-512 CPU
# restricted to AVX2 it paid for heads of up to 160 channels (0.80x the time of the GEMM path at 4096
# tokens of 40, 0.87-0.96x SDPA's at 256-1024 tokens; session 20). On a real AVX2 CPU (a Zen 3 EPYC)
# PyTorch's SDPA first beat it on every UNet head (session 24: 4096 tokens of 40, 626 against 448
# ms). Session 26 gave it blocks of keys (KEY_BLOCK), whole-vector stores (AVX2's masked store is
# microcoded on AMD's cores: the softmax pass took as long as either product) and keys packed in
# panels (see attention.cpp). Per call against SDPA there, fp32, batch 2, over three runs: 0.82-0.83x
# at 4096 tokens of 40, 0.86x at 1024 of 40, 0.66-0.75x for their cross-attention (77 keys),
# 0.91-0.95x at 1024 of 80, 0.87-0.99x at 256 of 160, 0.90-0.95x for SD2's 64-wide heads at 1024
# tokens; but 1.25-1.7x for the VAE's single 512-wide head. So it takes heads up to 160 channels
# wide: every UNet head of SD1 and SD2. SD1's whole UNet step took 0.98x the time with it at 64x64
# latents (0.88-1.07x per round; with the 40-wide heads alone, before the panels: 0.98x, 0.93-1.0x)
# and the same at 32x32 (1.006x, 0.97-1.11x: attention is a small part of that step).
MAX_HEAD_WIDTH: dict[str, int] = {"avx2": 160}


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why (the caller falls back, with a warning).
    ``every_build``: the cause is the compiler, its OpenMP or the cache folder, not the instruction
    set, so a build for another one would fail the same way."""

    def __init__(self, message: str, every_build: bool = False) -> None:
        super().__init__(message)
        self.every_build = every_build


# The OpenMP runtimes PyTorch is built with, by the start of their file names: GNU's (libgomp.so.1,
# libgomp-a34b3233.so.1), Intel's (libiomp5.so) and LLVM's (libomp.so, libomp.so.5); not their
# helpers (libomptarget.so, libiompstubs5.so).
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)[-.]")


def openmp_runtimes(maps: Iterable[str] | None = None) -> list[Path]:
    """The OpenMP runtime libraries loaded in this process, in the order ``/proc/self/maps`` (or
    ``maps``, its lines) lists them; none where it cannot be read."""
    return [path for path in _mapped_files(maps) if _OPENMP_RUNTIME.match(path.name)]


def openmp_runtime(maps: Iterable[str] | None = None) -> Path | None:
    """The OpenMP runtime PyTorch's threads run on, among those loaded in this process
    (:func:`openmp_runtimes`): the one PyTorch's CPU library (``libtorch_cpu.so``) needs by name;
    where that cannot be read (no ``readelf``), one shipped in PyTorch's own folder, else the first;
    None where none is loaded (the kernel then takes the compiler's default). Other libraries may
    bring runtimes of their own (scikit-learn's wheels ship a libgomp under a hashed name), so the
    first one mapped is not always PyTorch's."""
    files = _mapped_files(maps)
    needed = {_stem(n) for p in files if p.name.startswith("libtorch_cpu.") for n in _needed(p)}
    torch_dir = Path(torch.__file__).resolve().parent
    found = sorted((p for p in files if _OPENMP_RUNTIME.match(p.name)),  # stable: in map order otherwise
                   key=lambda p: (_stem(p.name) not in needed, torch_dir not in p.parents))
    return found[0] if found else None


def _mapped_files(maps: Iterable[str] | None) -> list[Path]:
    """The files mapped into this process, each once, in the order of ``/proc/self/maps`` (or
    ``maps``, its lines: address range, permissions, offset, device, inode, path)."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read().splitlines()
        except OSError:  # no /proc
            return []
    files: dict[Path, None] = {}
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.setdefault(Path(fields[5].strip()))
    return list(files)


def _needed(library: Path) -> set[str]:
    """The libraries ``library`` needs by name (its ELF ``NEEDED`` entries, read by binutils'
    ``readelf``, which the compiler needs anyway); empty where they cannot be read."""
    try:
        out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))


def _stem(name: str) -> str:
    """A library's name without its version: ``libgomp.so.1`` and ``libgomp.so.1.0.0`` -> ``libgomp``."""
    return name.split(".so", 1)[0]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$SDLITE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdlite``, else
    ``~/.cache/sdlite``."""
    if os.environ.get("SDLITE_CACHE_DIR"):
        return Path(os.environ["SDLITE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdlite"


@functools.cache
def isas() -> tuple[str, ...]:
    """The builds of the kernel (keys of ``ISA_FLAGS``) this CPU runs, best first: by PyTorch's
    capability of the CPU (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` lowers), on x86-64 Linux only. Elsewhere none: the build is a GCC/clang
    shared library with OpenMP, which Windows' compilers and Apple's clang do not make, so trying
    would only warn on every run."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    return _ISAS_OF_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ())


@functools.cache  # asked on every attention call; the CPU does not change
def cpu_supported(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this CPU runs the kernel for ``dtype``: fp32 on x86-64 with AVX2 and FMA or with
    AVX-512 (F, BW, VL, DQ: PyTorch's "AVX2" and "AVX512" capabilities), bf16 with AVX512-BF16 too
    (PyTorch's own probe), as :func:`sdlite.devices.cpu_has_native_bf16` judges the CPU (which a
    ``ONEDNN_MAX_CPU_ISA`` below bf16 lowers, as it lowers PyTorch's bf16 kernels)."""
    if dtype == torch.float32:
        return bool(isas())
    if dtype == torch.bfloat16 and "avx512" in isas():
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) and cpu_has_native_bf16()
    return False


def build(directory: Path | None = None, isa: str | None = None, source: Path | None = None) -> Path:
    """The kernel's shared library for ``isa`` (a key of ``ISA_FLAGS``; default: the best of
    :func:`isas`), compiled from ``source`` (default: the attention kernel's) into ``directory``
    (default :func:`cache_dir`) and linked against PyTorch's OpenMP runtime (:func:`openmp_runtime`),
    unless a build of this source, these flags, this compiler and this runtime is already there.
    Raises :class:`KernelUnavailable` with the compiler's message when it cannot be built."""
    isa = isa or next(iter(isas()), None)
    if isa not in ISA_FLAGS:
        raise KernelUnavailable(f"no build of the kernel for {isa or 'this CPU'} (there are: {', '.join(ISA_FLAGS)})")
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler!r} not found; set $CXX or install g++)", every_build=True)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{compiler!r} --version failed: {e}", every_build=True) from e
    runtime = openmp_runtime()
    # Linked against the runtime's file itself: the library then needs it by its own name (soname),
    # which the loader finds already loaded. Without one loaded, the compiler's default runtime.
    # --no-undefined: a runtime that lacks what the compiler's OpenMP code calls fails here, not at load.
    link = ((str(runtime),) if runtime else ("-fopenmp",)) + ("-Wl,--no-undefined",)
    source = source or SOURCE
    text = source.read_bytes()
    directory = directory or cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode is the new folder's, not its parents'
    except OSError as e:  # a read-only home, a file in the way
        raise KernelUnavailable(f"cannot create the kernel cache {directory} ({e.strerror or e}): set "
                                f"SDLITE_CACHE_DIR to a writable folder of your own", every_build=True) from e
    _check_private(directory)

    def named(flags: tuple[str, ...]) -> tuple[tuple[str, ...], Path]:
        key = hashlib.sha256(text + "\0".join(flags + link).encode() + version.encode()).hexdigest()[:16]
        return flags, directory / f"{source.stem}-{isa}-{key}.so"

    flags, library = named(FLAGS + ISA_FLAGS[isa])
    if not library.exists():  # probing the optional flags runs the compiler: only before a build
        flags, library = named(tuple(f for f in flags if f not in OPTIONAL_FLAGS or _accepts(compiler, version, f)))
    if library.exists():
        _check_private(library)
        return library
    log.info("building sdlite's CPU kernel %s (%s, OpenMP runtime %s) into %s (once per machine, ~1 s)",
             source.name, isa, runtime or "the compiler's", library)
    # Built in a temporary folder and renamed into place: a concurrent process never loads half a file.
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{library.stem}-") as work:
        obj, partial = Path(work) / f"{source.stem}.o", Path(work) / library.name
        for step, command in (("compile", [compiler, *flags, "-c", str(source), "-o", str(obj)]),
                              ("link", [compiler, "-shared", str(obj), *link, "-o", str(partial)])):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:  # cannot start, or hangs
                raise KernelUnavailable(f"{compiler} did not {step} {source.name}: {e}", every_build=True) from e
            if done.returncode != 0:
                against = f" against the OpenMP runtime {runtime}" if step == "link" and runtime else ""
                hint = _hint(done.stderr, runtime)  # a known cause: its last lines are enough
                raise KernelUnavailable(f"{compiler} failed to {step} {source.name}{against}{hint}:\n"
                                        f"{done.stderr.strip()[-(400 if hint else 2000):]}", every_build=bool(hint))
        os.replace(partial, library)
    return library


def _hint(stderr: str, runtime: Path | None) -> str:
    """What to do about the two failures a compiler other than g++ meets on Linux (clang's, seen with
    clang 14): no OpenMP headers, or OpenMP code written for another runtime than PyTorch's."""
    if "omp.h" in stderr and ("not found" in stderr or "No such file" in stderr):
        return (" (this compiler has no OpenMP headers: install its OpenMP package, for clang libomp-dev, "
                "or set CXX=g++)")
    if "__kmpc_" in stderr and runtime is not None and "gomp" in runtime.name:
        return (" (its OpenMP code calls LLVM's OpenMP runtime, and PyTorch runs on GCC's libgomp; a second "
                "runtime would keep a second thread pool on the same cores: set CXX=g++)")
    return ""


def _check_private(path: Path) -> None:
    """Raise :class:`KernelUnavailable` for a cache folder or library another user could have written:
    owned by someone else, or writable by every user."""
    st = path.stat()
    if st.st_uid != os.getuid():
        why = f"is owned by another user (uid {st.st_uid})"
    elif st.st_mode & stat.S_IWOTH:
        why = "is writable by every user"
    else:
        return
    raise KernelUnavailable(f"{path} {why}, and sdlite would load code from it: set SDLITE_CACHE_DIR to a folder "
                            f"of your own (or remove that one)", every_build=path.is_dir())


@functools.cache
def _accepts(compiler: str, version: str, flag: str) -> bool:
    """Whether ``compiler`` (of this ``--version`` text) takes ``flag``: preprocessing nothing with it."""
    try:
        return subprocess.run([compiler, flag, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _Kernel:
    """The loaded library's functions, with their C signatures: the two sizes, and the kernel for
    each dtype its instruction set has (``run[dtype]``: fp32, and bf16 in the AVX-512 build)."""

    def __init__(self, library: Path, isa: str):
        lib = ctypes.CDLL(str(library))
        self.isa, self.library = isa, library
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.pack_elements = lib.sdlite_attention_pack_elements  # (N, d, element bytes)
        self.pack_elements.argtypes, self.pack_elements.restype = [i64, i64, c_int], i64
        # (N, d, queries per task, keys per block, element bytes)
        self.scratch_bytes = lib.sdlite_attention_scratch_bytes
        self.scratch_bytes.argtypes, self.scratch_bytes.restype = [i64, i64, i64, i64, c_int], i64
        self.run = {dtype: getattr(lib, name) for dtype, name in
                    ((torch.float32, "sdlite_attention_fp32"), (torch.bfloat16, "sdlite_attention_bf16"))
                    if hasattr(lib, name)}
        strides = ctypes.POINTER(i64)
        for fn in self.run.values():
            fn.argtypes = [ptr] * 4 + [i64] * 5 + [strides] * 4 + [ctypes.c_float, i64, i64, c_int, ptr, ptr]
            fn.restype = None


@functools.cache
def load(isa: str | None = None) -> _Kernel | None:
    """The kernel for ``isa``, built if needed (see the module's text); by default the best of
    :func:`isas` that builds (a failed better one is said, as a warning). None where none can run
    here (said once, as a warning; PyTorch's ops run instead)."""
    if isa is not None and isa not in isas():
        raise ValueError(f"this CPU does not run the {isa!r} kernel (it runs: {', '.join(isas()) or 'none'})")
    failures = []
    for candidate in (isa,) if isa else isas():  # without AVX2 nothing to try, and nothing to say
        try:
            kernel = _Kernel(build(isa=candidate), candidate)
        except (KernelUnavailable, OSError) as e:
            failures.append(f"the {candidate} build: {e}")
            if getattr(e, "every_build", False):  # another instruction set would fail the same way
                break
            continue
        if failures:
            warnings.warn(f"sdlite's CPU attention kernel runs its {candidate} build, slower: "
                          f"{'; '.join(failures)}", RuntimeWarning, stacklevel=2)
        return kernel
    if failures:
        warnings.warn(f"sdlite's CPU attention kernel is not available ({'; '.join(failures)}); attention "
                      f"runs through PyTorch's ops, 1.5-2.5x slower (a whole UNet step up to 1.4x)",
                      RuntimeWarning, stacklevel=2)
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`attention` takes these, converted to ``dtype`` (default: theirs): CPU tensors
    ``[B, H, L, d]``, ``[B, H, N, d]`` twice, of one dtype, one ``d``, each with its last dimension
    contiguous, at least one key, and ``dtype`` fp32 or bf16 as :func:`cpu_supported` by this CPU.
    (Whether it is faster there than PyTorch's ops is :func:`pays`.)"""
    return (
        q.device.type == "cpu" and q.dim() == 4 and cpu_supported(dtype or q.dtype)
        and all(t.dtype == q.dtype and t.device == q.device and t.dim() == 4 and t.stride(-1) == 1
                for t in (q, k, v))
        and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
        and q.shape[3] == k.shape[3] == v.shape[3] > 0
    )


def may_pay() -> bool:
    """Whether the best build this CPU runs pays for any head at all (``MAX_HEAD_WIDTH``): where it
    does not, it is not even built."""
    best = isas()[:1]
    return bool(best) and MAX_HEAD_WIDTH.get(best[0]) != 0


def pays(kernel: _Kernel, keys: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the kernel is the faster path for heads of ``keys`` keys of width ``d`` in ``dtype``:
    while one head's packed keys and values fit in ``MAX_PACKED_HEAD_BYTES`` and the head is at
    most ``MAX_HEAD_WIDTH`` wide (the AVX2 build: 160 channels)."""
    size = dtype.itemsize
    return (d <= MAX_HEAD_WIDTH.get(kernel.isa, d)
            and kernel.pack_elements(keys, d, size) * size <= MAX_PACKED_HEAD_BYTES[dtype])


def attention(kernel: _Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / √d) v`` for tensors :func:`supports` takes; no autograd. The result is a
    ``[B, H, L, d]`` view of a ``[B, L, H, d]`` tensor, like :func:`sdlite.ops.attention`'s other paths.

    >>> kernel = load()  # doctest: +SKIP
    >>> out = attention(kernel, q, k, v)  # doctest: +SKIP
    """
    if q.dtype not in kernel.run:
        raise ValueError(f"the {kernel.isa} kernel has no {q.dtype} version (it has: {list(kernel.run)})")
    b, h, length, d = q.shape
    n = k.shape[2]
    size = q.element_size()
    out = torch.empty(b, length, h, d, dtype=q.dtype).transpose(1, 2)
    threads = torch.get_num_threads()
    pack = torch.empty(b * h * kernel.pack_elements(n, d, size), dtype=q.dtype)
    rows, keys = QUERY_BLOCK[kernel.isa], KEY_BLOCK[kernel.isa]
    scratch = torch.empty(threads * kernel.scratch_bytes(n, d, rows, keys, size), dtype=torch.uint8)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    kernel.run[q.dtype](q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, length, n, d, *strides,
                        d**-0.5, rows, keys, threads, pack.data_ptr(), scratch.data_ptr())
    return out


class Winograd:
    """The loaded transforms of ``sdlite/csrc/winograd.cpp`` (see there for the layouts), called by
    :func:`sdlite.ops.winograd_conv3x3`. Each takes contiguous fp32 tensors and runs on
    ``torch.get_num_threads()`` OpenMP threads. Which algorithm, F(2x2, 3x3) or F(4x4, 3x3), is told
    by the Winograd-domain tensor's first dimension: 16 or 36 positions (``TILES``)."""

    # Positions of the Winograd domain (n², n = m + 2) -> the output tile's side m.
    TILES = {16: 2, 36: 4}

    def __init__(self, library: Path, isa: str):
        lib = ctypes.CDLL(str(library))
        self.isa, self.library = isa, library
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._weights = lib.sdlite_winograd_weights_fp32  # (m, g, u, K, C, threads)
        self._weights.argtypes, self._weights.restype = [c_int, ptr, ptr, i64, i64, c_int], c_int
        self._input = lib.sdlite_winograd_input_fp32  # (m, x, v, C, H, W, up, t0, count, threads)
        self._input.argtypes, self._input.restype = [c_int, ptr, ptr, i64, i64, i64, c_int, i64, i64, c_int], c_int
        self._output = lib.sdlite_winograd_output_fp32  # (m, M, bias, y, K, H, W, LDY, t0, count, threads)
        self._output.argtypes, self._output.restype = [c_int, ptr, ptr, ptr] + [i64] * 6 + [c_int], c_int

    def _tile(self, domain: torch.Tensor) -> int:
        if domain.dim() != 3 or domain.shape[0] not in self.TILES:
            raise ValueError(f"a Winograd-domain tensor is [16 or 36, rows, channels], got {tuple(domain.shape)}")
        return self.TILES[domain.shape[0]]

    def weights(self, g: torch.Tensor, u: torch.Tensor) -> None:
        """``u[p, k, c] = (G g[k, c] Gᵀ)_p``: ``g`` ``[K, C, 3, 3]`` into ``u`` ``[n², K, C]``."""
        k, c = g.shape[:2]
        tile = self._tile(u)
        _check_layout((g, (k, c, 3, 3)), (u, (u.shape[0], k, c)))
        self._weights(tile, g.data_ptr(), u.data_ptr(), k, c, torch.get_num_threads())

    def input(self, x: torch.Tensor, v: torch.Tensor, t0: int, scale: int = 1) -> None:
        """``v[p, t - t0] = (Bᵀ d_t B)_p`` for the ``v.shape[1]`` tiles from ``t0`` of ``x`` ``[B, C, H, W]``
        (channels-last), upsampled ``scale`` times (1 or 2: nearest, never written out); ``v``:
        ``[n², count, C]``."""
        b, c, h, w = x.shape
        tile = self._tile(v)
        if scale not in (1, 2):
            raise ValueError(f"the Winograd kernel upsamples its input 1 or 2 times, not {scale}")
        _check_layout((x.permute(0, 2, 3, 1), (b, h, w, c)), (v, (v.shape[0], v.shape[1], c)))
        self._input(tile, x.data_ptr(), v.data_ptr(), c, h, w, scale, t0, v.shape[1], torch.get_num_threads())

    def output(self, m: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, t0: int, k0: int = 0) -> None:
        """The ``m.shape[1]`` output tiles from ``t0`` of ``y`` ``[B, C_out, H, W]`` (channels-last), its
        channels ``k0 .. k0 + K - 1``, from ``m`` ``[n², count, K]``, plus ``bias`` (``[K]`` or None)."""
        b, ldy, h, w = y.shape
        k = m.shape[2]
        tile = self._tile(m)
        if not 0 <= k0 <= ldy - k:
            raise ValueError(f"channels {k0}..{k0 + k - 1} are not in the output's {ldy}")
        _check_layout((y.permute(0, 2, 3, 1), (b, h, w, ldy)), (m, (m.shape[0], m.shape[1], k)),
                      *(((bias, (k,)),) if bias is not None else ()))
        first = y.data_ptr() + y.element_size() * k0  # channel k0 of the first pixel
        self._output(tile, m.data_ptr(), None if bias is None else bias.data_ptr(), first, k, h, w, ldy, t0,
                     m.shape[1], torch.get_num_threads())


def _check_layout(*tensors: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Raise ValueError unless each tensor is a contiguous fp32 CPU tensor of its shape: the C code
    reads raw memory, so a wrong layout would be wrong numbers, not an error."""
    for t, shape in tensors:
        if not (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape):
            raise ValueError(f"the Winograd kernel takes contiguous fp32 CPU tensors of shape {shape}, got "
                             f"{t.dtype} {t.device.type} {tuple(t.shape)} (contiguous: {t.is_contiguous()})")


@functools.cache
def load_winograd() -> Winograd | None:
    """The Winograd transforms for this CPU's best instruction set (:func:`isas`), built if needed (as
    the attention kernel is); None where they cannot run here, said once as a warning (3x3
    convolutions then run through oneDNN's direct convolution, as without them)."""
    isa = next(iter(isas()), None)
    if isa is None:
        return None
    try:
        return Winograd(build(isa=isa, source=WINOGRAD_SOURCE), isa)
    except (KernelUnavailable, OSError) as e:
        warnings.warn(f"sdlite's Winograd convolution kernel is not available ({e}); 3x3 convolutions of "
                      f"large maps run through oneDNN's direct convolution, 1.3-2x slower per convolution "
                      f"(a 512x512 UNet step ~1.1x)", RuntimeWarning, stacklevel=2)
        return None
