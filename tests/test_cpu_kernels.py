"""sdlite's C++ attention kernel, fp32 and bf16 (sdlite/cpu_kernels.py, sdlite/csrc/attention.cpp):
accuracy against an fp64 reference and against the GEMM path it replaces, the edge cases of its
padding and blocking, independence from the thread count, when ops.attention takes it, and how it
is built, cached and given up on."""

import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdlite import cpu_kernels, ops

needs_kernel = pytest.mark.skipif(not cpu_kernels.isas(), reason="the CPU has neither AVX-512 nor AVX2")
# Every build this CPU runs, with each dtype it has: fp32 in the AVX-512 and the AVX2 builds, bf16 in
# the AVX-512 build on a CPU with AVX512-BF16. An AVX-512 CPU runs the AVX2 build too, so both are
# tested here.
CASES = [pytest.param(isa, dtype, id=f"{isa}-{name}")
         for isa in cpu_kernels.isas()
         for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
         if dtype == torch.float32 or (isa == "avx512" and cpu_kernels.cpu_supported(torch.bfloat16))]


@pytest.fixture(scope="module")
def kernel():
    """The build ops.attention uses: the best this CPU runs."""
    k = cpu_kernels.load()
    assert k is not None, "this CPU has AVX2 or AVX-512, so the kernel must build (is a C++ compiler installed?)"
    return k


@pytest.fixture
def paying(kernel, monkeypatch):
    """``kernel``, with no limit on the heads it pays for (the AVX2 build pays for none,
    cpu_kernels.MAX_HEAD_WIDTH): for tests of how ops.attention routes to it."""
    monkeypatch.setattr(cpu_kernels, "MAX_HEAD_WIDTH", {})
    return kernel


def _build(isa):
    k = cpu_kernels.load(isa)
    assert k is not None, f"the {isa} kernel must build here (is a C++ compiler installed?)"
    return k


def _fresh_load():
    """``cpu_kernels.load()`` from scratch (its cache cleared before and after), and the warnings it gave."""
    cpu_kernels.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel = cpu_kernels.load()
    finally:
        cpu_kernels.load.cache_clear()
    return kernel, [str(w.message) for w in caught]


def _qkv(b, heads, length, keys, d, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, length, heads, d, generator=g)).to(dtype).transpose(1, 2)  # the UNet's strided heads
    k = (scale * torch.randn(b, keys, heads, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, heads, keys, d, generator=g).to(dtype)
    return q, k, v


def _errors(x, exact):
    e = (x.double() - exact).abs()
    return e.mean().item(), e.max().item()


@needs_kernel
@pytest.mark.parametrize("b, heads, length, keys, d", [
    (1, 1, 1, 1, 1),        # one query, one key: the output is v
    (1, 1, 5, 7, 3),        # odd head size and key count: the padded pairs
    (2, 3, 37, 50, 40),     # rows not a multiple of the register tile (8; 6 for AVX2) or the query block
    (1, 2, 100, 1031, 64),  # keys past the 48-key tiles
    (1, 2, 20, 33, 72),     # a whole tile of channels, then one half-used vector shared by two rows (AVX-512)
    (2, 8, 64, 77, 160),    # the UNet's cross-attention at 8x8, widest heads (SD1.5)
    (1, 1, 200, 200, 512),  # the VAE's single 512-wide head
])
@pytest.mark.parametrize("isa, dtype", CASES)
def test_kernel_is_as_accurate_as_the_gemm_path_against_fp64(isa, b, heads, length, keys, d, dtype):
    kernel = _build(isa)
    # Same arithmetic as the GEMM path (fp32 sums, scores and softmax; for bf16 the probabilities
    # rounded to bf16). In bf16 the mean error against fp64 must be no larger (it is ~0.8-0.95x: the
    # division by the row sum comes last, in fp32) and no single element further off than the GEMM
    # path's worst plus one bf16 step of the output; in fp32, where the two differ by the order of
    # their sums, within 1.5x (measured 0.6-1.25x; 1.7x on the 5x7 case, 45 numbers) plus one fp32
    # step, and a few fp32 steps.
    q, k, v = _qkv(b, heads, length, keys, d, seed=length + keys + d, dtype=dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = cpu_kernels.attention(kernel, q, k, v)
    gemm = ops._attention_by_gemm(q.float(), k.float(), v, None).to(dtype)
    assert ours.shape == exact.shape and ours.dtype == dtype
    (mean, worst), (gemm_mean, gemm_worst) = _errors(ours, exact), _errors(gemm, exact)
    scale = exact.abs().max().item()
    if dtype == torch.bfloat16:
        assert mean <= 1.05 * gemm_mean + 1e-6, (mean, gemm_mean)
        assert worst <= gemm_worst + 2**-8 * scale, (worst, gemm_worst)
    else:
        assert mean <= 1.5 * gemm_mean + 2**-24 * scale, (mean, gemm_mean)
        assert worst <= 2 * gemm_worst + 4 * 2**-24 * scale, (worst, gemm_worst)


def _pow2_polynomials():
    """The coefficients of the kernel's two polynomials for 2^f (fp32, bf16), highest degree first,
    read from its source."""
    source = cpu_kernels.SOURCE.read_text()
    polys = {}
    for name in ("FP32", "BF16"):
        listed = re.search(r"static const float POW2_%s\[\] = \{(.*?)\};" % name, source).group(1)
        polys[name.lower()] = [float.fromhex(c.strip().rstrip("f")) if "0x" in c else float(c.strip().rstrip("f"))
                               for c in listed.split(",")]
    return polys


@pytest.mark.parametrize("name, degree, bound", [("fp32", 5, 2.5e-7), ("bf16", 4, 3.0e-6)])
def test_the_softmax_powers_of_two_are_as_accurate_as_the_source_says(name, degree, bound):
    # e = 2^t = 2^n p(f), |f| <= 1/2: p evaluated as the kernel does (Horner, each step one FMA:
    # the product of two fp32 numbers is exact in fp64, then one rounding to fp32). Its relative
    # error bounds the probabilities': fp32's near its precision (2^-23 = 1.2e-7), bf16's far below
    # the rounding to bf16 that follows (2^-9 = 2e-3). p(0) = 1 exactly: the row's largest term is 1.
    coefficients = _pow2_polynomials()[name]
    assert len(coefficients) == degree + 1 and coefficients[-1] == 1.0
    f = np.linspace(-0.5, 0.5, 200_001).astype(np.float32)
    p = np.full_like(f, coefficients[0])
    for c in coefficients[1:]:
        p = (p.astype(np.float64) * f + np.float32(c)).astype(np.float32)
    error = np.abs(p.astype(np.float64) / np.exp2(f.astype(np.float64)) - 1)
    assert error.max() <= bound, error.max()
    assert p[f == 0][0] == 1.0


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
def test_one_key_gives_its_value_and_peaked_scores_stay_finite(isa, dtype):
    kernel = _build(isa)
    q, k, v = _qkv(1, 2, 9, 1, 40, seed=1, dtype=dtype)
    assert torch.equal(cpu_kernels.attention(kernel, q, k, v), v.expand(1, 2, 9, 40))
    # Scores of +-1000s: the softmax is one-hot up to rounding; nothing overflows.
    q, k, v = _qkv(1, 2, 40, 100, 40, seed=2, scale=30.0, dtype=dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = cpu_kernels.attention(kernel, q, k, v)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), exact, rtol=2**-7, atol=2**-7)


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
@pytest.mark.parametrize("keys", [1, 15, 16, 17, 47, 48, 50, 95])  # around the tiles: 16 keys (AVX2), 48 (AVX-512)
def test_padded_keys_never_take_weight(isa, keys, dtype):
    kernel = _build(isa)
    # Every real score very negative and equal: the softmax is uniform, the output is the mean of v.
    # A padded key (zeros: score 0) let into the softmax would take all the weight instead.
    d = 40
    q = torch.full((1, 1, 3, d), -4.0, dtype=dtype)
    k = torch.full((1, 1, keys, d), 4.0, dtype=dtype)
    v = torch.randn(1, 1, keys, d, generator=torch.Generator().manual_seed(keys)).to(dtype)
    ours = cpu_kernels.attention(kernel, q, k, v)
    torch.testing.assert_close(ours.float(), v.float().mean(2, keepdim=True).expand_as(ours), rtol=2**-7, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
def test_a_nan_reaches_the_rows_it_touches(isa, dtype):
    kernel = _build(isa)
    # A NaN must not be hidden (sdlite reports NaN latents): in a query, that query's row is NaN;
    # in a key, every row is.
    q, k, v = _qkv(1, 1, 40, 60, 16, seed=3, dtype=dtype)
    q[0, 0, 5, 3] = float("nan")
    out = cpu_kernels.attention(kernel, q, k, v)
    assert out[0, 0, 5].isnan().all() and not out[0, 0, torch.arange(40) != 5].isnan().any()
    q, k, v = _qkv(1, 1, 40, 60, 16, seed=3, dtype=dtype)
    k[0, 0, 17, 0] = float("nan")
    assert cpu_kernels.attention(kernel, q, k, v).isnan().all()


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
@pytest.mark.parametrize("block", [1, 16, 100])  # one register tile of keys (16 AVX2, 48 AVX-512), or a few
def test_keys_in_blocks_give_the_softmax_of_all_of_them(isa, dtype, block, monkeypatch):
    # With KEY_BLOCK set, each task takes the keys a block at a time and rescales its sums when a
    # block raises a row's largest score (online softmax). The scores here grow along the keys, so
    # nearly every block rescales: the result must stay as accurate against fp64 as in one block
    # (the fp32 sums are rescaled by at most one rounding per block, ~1e-7 each), peaked rows must
    # stay finite, and a NaN in a late block must still reach every row.
    kernel = _build(isa)
    q, k, v = _qkv(2, 3, 37, 300, 40, seed=5, dtype=dtype)
    k = (k.float() * torch.linspace(0.1, 3.0, 300)[:, None]).to(dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    monkeypatch.setitem(cpu_kernels.KEY_BLOCK, isa, 0)
    whole = cpu_kernels.attention(kernel, q, k, v)
    monkeypatch.setitem(cpu_kernels.KEY_BLOCK, isa, block)
    blocked = cpu_kernels.attention(kernel, q, k, v)
    (mean, worst), (whole_mean, whole_worst) = _errors(blocked, exact), _errors(whole, exact)
    step = (2**-8 if dtype == torch.bfloat16 else 2**-23) * exact.abs().max().item()
    assert mean <= 1.5 * whole_mean + step / 2, (mean, whole_mean)
    assert worst <= 2 * whole_worst + 2 * step, (worst, whole_worst)
    q, k, v = _qkv(1, 2, 40, 100, 40, seed=2, scale=30.0, dtype=dtype)  # scores of +-1000s
    assert torch.isfinite(cpu_kernels.attention(kernel, q, k, v)).all()
    q, k, v = _qkv(1, 1, 40, 300, 16, seed=3, dtype=dtype)
    k[0, 0, 290, 0] = float("nan")
    assert cpu_kernels.attention(kernel, q, k, v).isnan().all()


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
def test_one_block_of_all_the_keys_is_the_unblocked_kernel(isa, dtype, monkeypatch):
    # A block of at least N keys is one block: the same numbers as KEY_BLOCK = 0, bit for bit.
    kernel = _build(isa)
    q, k, v = _qkv(1, 2, 30, 77, 40, seed=6, dtype=dtype)
    monkeypatch.setitem(cpu_kernels.KEY_BLOCK, isa, 0)
    whole = cpu_kernels.attention(kernel, q, k, v)
    monkeypatch.setitem(cpu_kernels.KEY_BLOCK, isa, 77)
    assert torch.equal(cpu_kernels.attention(kernel, q, k, v), whole)


@needs_kernel
@pytest.mark.parametrize("isa, dtype", CASES)
def test_the_result_does_not_depend_on_the_thread_count(isa, dtype):
    kernel = _build(isa)
    q, k, v = _qkv(2, 3, 150, 300, 40, seed=4, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(cpu_kernels.attention(kernel, q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_ops_attention_takes_the_kernel_for_cpu_inference_only(paying, monkeypatch):
    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(a[1].dtype) or real(*a))
    q, k, v = _qkv(1, 2, 20, 30, 8, seed=5, dtype=torch.float32)
    with torch.no_grad():
        ops.attention(q, k, v)                                     # fp32: the kernel
        ops.attention(q.double(), k.double(), v.double())          # fp64: not
        ops.attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)  # head dim strided: not
        if cpu_kernels.cpu_supported(torch.bfloat16):
            ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # bf16: the kernel
        monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
        ops.attention(q, k, v)                                     # switched off: not
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ("cpu",))
    ops.attention(q.clone().requires_grad_(), k, v)                # gradients recorded: not
    assert calls == [torch.float32] + [torch.bfloat16] * cpu_kernels.cpu_supported(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_inputs_without_native_kernels_run_in_fp32(paying, half, monkeypatch):
    # fp16 on a CPU without AVX512-FP16, bf16 on one without AVX512-BF16 (HALF_AS_FP32): the fp32
    # kernel on upcast tensors, the result rounded once to the input's dtype, as sdlite's
    # convolutions and linear layers do there.
    real_supported = cpu_kernels.cpu_supported
    monkeypatch.setattr(cpu_kernels, "cpu_supported", lambda dtype=torch.float32: dtype == torch.float32
                        and real_supported(dtype))
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset({half}))
    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(a[1].dtype) or real(*a))
    q, k, v = _qkv(2, 3, 40, 60, 24, seed=8, dtype=half)
    with torch.no_grad():
        out = ops.attention(q, k, v)
    assert calls == [torch.float32] and out.dtype == half and out.shape == q.shape
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(half)
    # Both round an fp32 result to the half type: at most one step of it apart.
    assert (out.float() - expected.float()).abs().max() <= torch.finfo(half).eps * expected.float().abs().max()


@pytest.mark.skipif("avx512" not in cpu_kernels.isas(), reason="the CPU has no AVX-512")
def test_the_avx512_build_takes_heads_that_fit_the_cache():
    # The VAE's 512-wide head at 4096 tokens (a 512x512 image) packs into 8.4 MB: the kernel; at
    # 16384 tokens (1024x1024) into 34 MB, past MAX_PACKED_HEAD_BYTES: the GEMM path, faster there.
    # In fp32 it packs twice as large and the limit is 8 MB: 256x256 images (1024 tokens, 4.1 MB) take
    # the kernel, 384x384 (2304 tokens, 9.0 MB) the GEMM path.
    kernel, bf16, fp32 = _build("avx512"), torch.bfloat16, torch.float32
    assert cpu_kernels.pays(kernel, 4096, 512, bf16) and not cpu_kernels.pays(kernel, 16384, 512, bf16)
    assert cpu_kernels.pays(kernel, 1024, 512, fp32) and not cpu_kernels.pays(kernel, 2304, 512, fp32)
    assert cpu_kernels.pays(kernel, 16384, 40, fp32)  # the UNet's 1024x1024 self-attention: 5.5 MB a head


@needs_kernel
def test_the_avx2_build_takes_the_unets_heads_and_not_the_vaes():
    # On a real AVX2 CPU the kernel beat PyTorch's SDPA on every UNet head (40 to 160 channels, SD2's
    # 64) and lost on the VAE's single 512-wide head (cpu_kernels.MAX_HEAD_WIDTH): attention takes
    # the AVX2 build for the former at any length that fits MAX_PACKED_HEAD_BYTES, and SDPA for the latter.
    kernel = _build("avx2")
    assert all(cpu_kernels.pays(kernel, n, d, torch.float32) for n in (77, 1024, 4096) for d in (8, 40, 64, 80, 160))
    assert not any(cpu_kernels.pays(kernel, n, d, dtype) for n in (77, 1024, 4096)
                   for d in (161, 512) for dtype in (torch.float32, torch.bfloat16))


def test_a_cpu_whose_best_build_pays_for_nothing_does_not_build_it(monkeypatch):
    # A build that pays for no head (MAX_HEAD_WIDTH 0, as the AVX2 one was until session 26) is
    # never asked for, so it is not compiled; a CPU whose best build pays builds it.
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))
    monkeypatch.setitem(cpu_kernels.MAX_HEAD_WIDTH, "avx2", 0)
    monkeypatch.setattr(cpu_kernels, "load", lambda *a: pytest.fail("the kernel was built"))
    q = torch.randn(1, 2, 20, 8)
    with torch.no_grad():
        torch.testing.assert_close(ops.attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
    assert not cpu_kernels.may_pay()
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx512", "avx2"))
    assert cpu_kernels.may_pay()
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ())
    assert not cpu_kernels.may_pay()


@needs_kernel
def test_heads_too_large_for_the_cache_take_another_path(paying, monkeypatch):
    fp32 = torch.float32
    monkeypatch.setitem(cpu_kernels.MAX_PACKED_HEAD_BYTES, fp32, paying.pack_elements(100, 8, 4) * 4)
    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(a[2].shape[2]) or real(*a))
    q = torch.randn(1, 1, 10, 8)
    with torch.no_grad():
        for keys in (100, 101, 150):
            kv = torch.randn(1, 1, keys, 8)
            out = ops.attention(q, kv, kv)
            torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q.float(), kv.float(), kv.float()),
                                       rtol=2**-7, atol=2e-2)
    assert calls == [100]


@needs_kernel
def test_supports_fp32_and_bf16_with_a_contiguous_head_dimension():
    q = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
    assert cpu_kernels.supports(q, q, q) == cpu_kernels.cpu_supported(torch.bfloat16)
    assert cpu_kernels.supports(q.float(), q.float(), q.float())
    assert not cpu_kernels.supports(q.double(), q.double(), q.double())
    assert not cpu_kernels.supports(q.half(), q.half(), q.half())
    assert not cpu_kernels.supports(q, q[:, :, :0], q[:, :, :0])  # no keys
    assert not cpu_kernels.supports(q, q[..., :4], q)              # head sizes differ
    wide = torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16)[..., ::2]
    assert not cpu_kernels.supports(wide, wide, wide)


@needs_kernel
def test_a_build_is_reused_and_a_changed_source_builds_anew(tmp_path, monkeypatch):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    changed = tmp_path / "attention.cpp"
    changed.write_text(cpu_kernels.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
    second = cpu_kernels.build(tmp_path)
    assert second != first and second.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_outside_linux_no_build_is_tried(monkeypatch):
    # Windows' compilers and Apple's clang make no OpenMP shared library: no build, and no warning.
    monkeypatch.setattr(cpu_kernels.sys, "platform", "win32")
    cpu_kernels.isas.cache_clear()
    try:
        assert cpu_kernels.isas() == ()
    finally:
        cpu_kernels.isas.cache_clear()


@needs_kernel
def test_each_instruction_set_has_its_own_build(tmp_path):
    builds = {isa: cpu_kernels.build(tmp_path, isa) for isa in cpu_kernels.isas()}
    assert len(set(builds.values())) == len(builds) and all(isa in p.name for isa, p in builds.items())
    with pytest.raises(cpu_kernels.KernelUnavailable, match="no build of the kernel for sse2"):
        cpu_kernels.build(tmp_path, "sse2")


@needs_kernel
def test_the_avx2_build_has_no_bf16_and_says_so():
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert list(_build("avx2").run) == [torch.float32]
    with pytest.raises(ValueError, match="avx2 kernel has no torch.bfloat16"):
        cpu_kernels.attention(_build("avx2"), q, q, q)


AVX2_ONLY = """
import torch, torch.nn.functional as F
from sdlite import cpu_kernels, ops
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
assert cpu_kernels.isas() == ("avx2",) and not cpu_kernels.cpu_supported(torch.bfloat16)
assert cpu_kernels.load().isa == "avx2"
try:
    cpu_kernels.load("avx512")
    raise SystemExit("load('avx512') should have refused")
except ValueError as e:
    assert "does not run the 'avx512' kernel" in str(e)
calls = []
real = cpu_kernels.attention
cpu_kernels.attention = lambda *a: calls.append(a[0].isa) or real(*a)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 50, 512, generator=g) for _ in range(3))
assert ops.GEMM_ATTENTION_MIN_KEYS is None  # measured slower than SDPA with AVX2 alone
with torch.no_grad():
    ops.attention(q, k, v)  # the VAE's 512-wide head, past the AVX2 build's MAX_HEAD_WIDTH: SDPA
    assert calls == [], calls
    q, k, v = (torch.randn(2, 3, 50, 40, generator=g) for _ in range(3))
    out = ops.attention(q, k, v)  # a UNet head, 40 wide: the AVX2 build, with SDPA's result
assert calls == ["avx2"], calls
torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
print("ok")
"""


@needs_kernel
def test_a_cpu_with_avx2_only_runs_the_avx2_build():
    # PyTorch's ATEN_CPU_CAPABILITY lowers the capability it reports, as on a CPU without AVX-512.
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", AVX2_ONLY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _compiler_script(path, before: str):
    """A $CXX at ``path``: a shell script that runs ``before``, then is the real c++."""
    import shutil

    path.write_text(f"#!/bin/sh\n{before}\nexec {shutil.which(os.environ.get('CXX') or 'c++')} \"$@\"\n")
    path.chmod(0o755)
    return path


def _wrapped_compiler(tmp_path, refuse: str):
    """A $CXX that fails as an old or broken compiler does whenever its arguments include ``refuse``,
    and is the real c++ otherwise."""
    return _compiler_script(tmp_path / "old-cxx", f"""for a in "$@"; do
  if [ "$a" = "{refuse}" ]; then echo "c++: error: unrecognized command-line option '{refuse}'" >&2; exit 1; fi
done""")


@pytest.mark.skipif("avx512" not in cpu_kernels.isas(), reason="the CPU has no AVX-512")
def test_a_compiler_without_avx512_bf16_builds_the_fp32_kernel(tmp_path, monkeypatch):
    # g++ 9 (Ubuntu 20.04) has AVX-512 but not -mavx512bf16: the AVX-512 build without bf16, whose
    # bf16 attention then takes the GEMM path.
    monkeypatch.setenv("CXX", str(_wrapped_compiler(tmp_path, "-mavx512bf16")))
    kernel = cpu_kernels._Kernel(cpu_kernels.build(tmp_path / "cache", "avx512"), "avx512")
    assert list(kernel.run) == [torch.float32]
    monkeypatch.setattr(cpu_kernels, "load", lambda isa=None: kernel)
    calls = []
    real = cpu_kernels.attention
    monkeypatch.setattr(cpu_kernels, "attention", lambda *a: calls.append(a[1].dtype) or real(*a))
    q, k, v = _qkv(1, 2, 20, 30, 8, seed=9, dtype=torch.float32)
    with torch.no_grad():
        ops.attention(q, k, v)
        out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert calls == [torch.float32] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v), rtol=2**-7, atol=2e-2)


@pytest.mark.skipif(len(cpu_kernels.isas()) < 2, reason="the CPU runs one build only")
def test_a_build_that_fails_gives_way_to_the_next_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(_wrapped_compiler(tmp_path, "-mavx512f")))
    monkeypatch.setenv("SDLITE_CACHE_DIR", str(tmp_path / "cache"))
    kernel, said = _fresh_load()
    assert kernel is not None and kernel.isa == cpu_kernels.isas()[1]
    assert [m for m in said if "runs its avx2 build, slower" in m and "-mavx512f" in m]


def test_without_a_compiler_the_build_says_so_and_attention_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_kernels.KernelUnavailable, match="no C\\+\\+ compiler"):
        cpu_kernels.build(tmp_path)
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))  # so that it tries, on any CPU
    kernel, said = _fresh_load()
    assert kernel is None and any("runs through PyTorch's ops" in m for m in said)
    q = torch.randn(1, 2, 20, 8)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same warning again
            out = ops.attention(q, q, q)  # the fallback path
    finally:
        cpu_kernels.load.cache_clear()
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q.float(), q.float(), q.float()),
                               rtol=2**-7, atol=2e-2)


def test_a_failing_compiler_leaves_no_partial_file(tmp_path, monkeypatch):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\necho 'error: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(cpu_kernels.KernelUnavailable, match="nope"):
        cpu_kernels.build(tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLITE_CACHE_DIR", str(tmp_path / "a"))
    assert cpu_kernels.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SDLITE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "sdlite"
    assert os.environ.get("SDLITE_CACHE_DIR") is None


def test_a_compiler_that_hangs_is_given_up_on(tmp_path, monkeypatch):
    import subprocess

    real = subprocess.run

    def run(cmd, **kwargs):
        if "--version" in cmd:
            return real(["echo", "fake 1.0"], **kwargs)
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(cpu_kernels.subprocess, "run", run)
    with pytest.raises(cpu_kernels.KernelUnavailable, match="did not compile attention.cpp: .* timed out") as failed:
        cpu_kernels.build(tmp_path)
    assert failed.value.every_build  # not tried again for another instruction set: another 10 minutes
    assert not list(tmp_path.iterdir())


# Lines of /proc/self/maps as PyTorch's builds leave them: address range, permissions, offset,
# device, inode, path (the helpers of a runtime, and a path with a space, must not be taken for it).
_MAPS = {
    "pip wheel": ["/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
                  "/venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1"],
    "pip wheel, hashed name": ["/usr/lib/x86_64-linux-gnu/libomptarget.so",
                               "/venv/lib/python3.11/site-packages/torch/lib/libgomp-a34b3233.so.1"],
    "conda, MKL": ["/opt/conda/lib/libiompstubs5.so", "/opt/conda/lib/libiomp5.so"],
    "LLVM": ["/my dir/lib/libomp.so.5"],
    "none": ["/usr/lib/x86_64-linux-gnu/libc.so.6", "[heap]"],
}
_RUNTIME_OF = {"pip wheel": "libgomp.so.1", "pip wheel, hashed name": "libgomp-a34b3233.so.1",
               "conda, MKL": "libiomp5.so", "LLVM": "libomp.so.5", "none": None}


def _maps_lines(paths, torch_dir=None):
    lines = []
    for i, path in enumerate(paths):
        if torch_dir and "site-packages/torch/" in path:
            path = str(torch_dir / path.split("site-packages/torch/")[1])
        for perms in ("r--p", "r-xp"):  # each file is mapped several times
            lines.append(f"7f{i:02x}00000000-7f{i:02x}00001000 {perms} 00000000 08:01 {1000 + i}   {path}")
    return lines


@pytest.mark.parametrize("build", list(_MAPS))
def test_the_openmp_runtime_is_the_one_mapped_into_the_process(build):
    from pathlib import Path

    torch_dir = Path(torch.__file__).resolve().parent
    found = cpu_kernels.openmp_runtime(_maps_lines(_MAPS[build], torch_dir))
    assert (found.name if found else None) == _RUNTIME_OF[build]


def test_every_runtime_mapped_is_listed_once_in_order():
    maps = _maps_lines(["/a/libiomp5.so", "/b/libgomp.so.1", "/a/libomptarget.so", "/a/libiomp5.so"])
    assert [str(p) for p in cpu_kernels.openmp_runtimes(maps)] == ["/a/libiomp5.so", "/b/libgomp.so.1"]
    assert cpu_kernels.openmp_runtimes([]) == [] and cpu_kernels.openmp_runtime([]) is None


def test_pytorchs_own_runtime_is_preferred_where_two_are_loaded():
    from pathlib import Path

    torch_dir = Path(torch.__file__).resolve().parent
    maps = _maps_lines(["/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/venv/site-packages/torch/lib/libgomp.so.1"],
                       torch_dir)
    assert cpu_kernels.openmp_runtime(maps) == torch_dir / "lib" / "libgomp.so.1"
    assert cpu_kernels.openmp_runtime(maps[:2]) == Path("/usr/lib/x86_64-linux-gnu/libgomp.so.1")


@needs_kernel
def test_the_kernel_adds_no_second_openmp_runtime_to_the_process(kernel):
    # Two runtimes keep two thread pools spinning on the same cores (1.7x slower UNet steps).
    assert cpu_kernels.openmp_runtimes() == [cpu_kernels.openmp_runtime()]
    with open("/proc/self/maps") as f:
        assert "/attention-" in f.read()  # with the kernel loaded


def _recording_compiler(tmp_path):
    """A $CXX that is the real c++, and writes each command line it is given to ``calls.txt``."""
    log = tmp_path / "calls.txt"
    return _compiler_script(tmp_path / "recording-cxx", f'echo "$@" >> {log}'), log


@needs_kernel
def test_the_kernel_is_linked_against_pytorchs_runtime_and_no_other(tmp_path, monkeypatch):
    import subprocess

    fake, log = _recording_compiler(tmp_path)
    monkeypatch.setenv("CXX", str(fake))
    runtime = cpu_kernels.openmp_runtime()
    library = cpu_kernels.build(tmp_path / "cache")
    link = [line.split() for line in log.read_text().splitlines() if "-shared" in line.split()]
    assert len(link) == 1 and str(runtime) in link[0] and "-fopenmp" not in link[0]
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    assert f"[{runtime.name}]" in needed  # its soname: the loader finds the one already loaded
    assert sum(cpu_kernels._OPENMP_RUNTIME.search(line) is not None for line in needed.splitlines()
               if "(NEEDED)" in line) == 1
    assert list((tmp_path / "cache").iterdir()) == [library]  # no object file or folder left behind


@needs_kernel
def test_another_runtime_builds_another_kernel_and_without_one_the_compilers(tmp_path, monkeypatch):
    fake, log = _recording_compiler(tmp_path)
    monkeypatch.setenv("CXX", str(fake))
    ours = cpu_kernels.build(tmp_path / "cache")
    monkeypatch.setattr(cpu_kernels, "openmp_runtime", lambda: None)  # PyTorch without OpenMP
    default = cpu_kernels.build(tmp_path / "cache")
    assert default != ours
    assert "-fopenmp" in log.read_text().splitlines()[-1].split()  # linked with the compiler's own runtime
    cpu_kernels._Kernel(default, default.name.split("-")[1])  # and it loads


def test_a_runtime_that_cannot_be_linked_says_which(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setattr(cpu_kernels, "openmp_runtime", lambda: Path("/nowhere/libiomp5.so"))
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))  # so that it builds, on any x86 CPU
    with pytest.raises(cpu_kernels.KernelUnavailable, match="failed to link attention.cpp against the OpenMP "
                                                             "runtime /nowhere/libiomp5.so"):
        cpu_kernels.build(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def _failing_compiler(tmp_path, step_flag: str, message: str):
    """A $CXX that prints ``message`` and fails when its arguments include ``step_flag`` (``-c``:
    compiling, ``-shared``: linking), and is the real c++ otherwise."""
    said = tmp_path / "message.txt"
    said.write_text(message + "\n")  # read back by cat: no shell quoting of the compiler's quotes
    return _compiler_script(tmp_path / "failing-cxx", f"""for a in "$@"; do
  if [ "$a" = "{step_flag}" ]; then cat '{said}' >&2; exit 1; fi
done""")


def test_a_compiler_without_openmp_headers_says_what_to_install(tmp_path, monkeypatch):
    # clang without libomp-dev (clang 14's words).
    monkeypatch.setenv("CXX", str(_failing_compiler(
        tmp_path, "-c", "attention.cpp:29:10: fatal error: 'omp.h' file not found")))
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))
    with pytest.raises(cpu_kernels.KernelUnavailable,
                       match=r"failed to compile attention.cpp \(this compiler has no OpenMP headers: install "
                             r"its OpenMP package, for clang libomp-dev, or set CXX=g\+\+\)"):
        cpu_kernels.build(tmp_path / "cache")


def test_a_compiler_level_failure_is_said_once_not_per_build(tmp_path, monkeypatch):
    # Without OpenMP headers every instruction set's build fails alike: one short reason, no retry.
    monkeypatch.setenv("CXX", str(_failing_compiler(
        tmp_path, "-c", "attention.cpp:29:10: fatal error: 'omp.h' file not found")))
    monkeypatch.setenv("SDLITE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx512", "avx2"))
    kernel, said = _fresh_load()
    assert kernel is None and len(said) == 1
    assert "the avx512 build" in said[0] and "the avx2 build" not in said[0]
    assert "install its OpenMP package" in said[0] and len(said[0]) < 800


@pytest.mark.parametrize("runtime, advised", [("torch/lib/libgomp.so.1", True), ("lib/libiomp5.so", False)])
def test_openmp_code_for_llvms_runtime_in_a_process_on_libgomp_says_to_use_gxx(tmp_path, monkeypatch, runtime, advised):
    # clang's OpenMP code calls __kmpc_* (LLVM's runtime), which libgomp lacks; Intel's runtime has them.
    from pathlib import Path

    monkeypatch.setenv("CXX", str(_failing_compiler(
        tmp_path, "-shared", "attention.cpp:(.text+0x517): undefined reference to `__kmpc_fork_call'")))
    monkeypatch.setattr(cpu_kernels, "openmp_runtime", lambda: Path("/env") / runtime)
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))
    with pytest.raises(cpu_kernels.KernelUnavailable, match="failed to link") as failed:
        cpu_kernels.build(tmp_path / "cache")
    assert ("calls LLVM's OpenMP runtime, and PyTorch runs on GCC's libgomp" in str(failed.value)) == advised
    assert ("set CXX=g++" in str(failed.value)) == advised
    assert "__kmpc_fork_call" in str(failed.value)  # the linker's own words follow


@pytest.mark.skipif(shutil.which("clang++") is None, reason="no clang++ here")
def test_clang_fails_with_advice_where_pytorch_runs_on_libgomp(tmp_path, monkeypatch):
    # The real compiler: without libomp-dev it lacks omp.h; with it, its code needs LLVM's runtime.
    runtime = cpu_kernels.openmp_runtime()
    if runtime is None or "gomp" not in runtime.name:
        pytest.skip(f"PyTorch does not run on libgomp here ({runtime})")
    monkeypatch.setenv("CXX", "clang++")
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))
    with pytest.raises(cpu_kernels.KernelUnavailable, match=r"set CXX=g\+\+"):
        cpu_kernels.build(tmp_path / "cache")


@needs_kernel
def test_a_new_cache_folder_is_private(tmp_path):
    cpu_kernels.build(tmp_path / "a" / "cache")
    assert (tmp_path / "a" / "cache").stat().st_mode & 0o777 == 0o700


@needs_kernel
def test_a_cache_folder_or_library_others_could_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # as /tmp: anyone may add files
    with pytest.raises(cpu_kernels.KernelUnavailable, match="shared is writable by every user.*SDLITE_CACHE_DIR"):
        cpu_kernels.build(shared)
    assert not list(shared.iterdir())  # nothing built there
    mine = tmp_path / "mine"
    library = cpu_kernels.build(mine)
    library.chmod(0o666)
    with pytest.raises(cpu_kernels.KernelUnavailable, match="so is writable by every user"):
        cpu_kernels.build(mine)
    library.chmod(0o755)
    assert cpu_kernels.build(mine) == library
    someone_else = os.getuid() + 1
    monkeypatch.setattr(cpu_kernels.os, "getuid", lambda: someone_else)
    with pytest.raises(cpu_kernels.KernelUnavailable, match="mine is owned by another user"):
        cpu_kernels.build(mine)


def test_a_refused_cache_folder_leaves_attention_on_pytorchs_ops_with_a_warning(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SDLITE_CACHE_DIR", str(shared))
    monkeypatch.setattr(cpu_kernels, "isas", lambda: ("avx2",))  # so that it tries, on any CPU
    kernel, said = _fresh_load()
    assert kernel is None and any("is writable by every user" in m and "PyTorch's ops" in m for m in said)


@needs_kernel
def test_a_cache_folder_that_cannot_be_made_says_how_to_choose_another(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(cpu_kernels.KernelUnavailable, match="cannot create the kernel cache .*SDLITE_CACHE_DIR"):
        cpu_kernels.build(tmp_path / "file" / "cache")


@needs_kernel
def test_the_runtime_pytorchs_library_needs_wins_over_others_mapped_first(tmp_path):
    # As conda's PyTorch on Intel's runtime, with scikit-learn's wheel bringing a hashed libgomp:
    # a stand-in libtorch_cpu.so that needs "libgomp-1234abcd.so.1", mapped after a libiomp5.so.
    import subprocess

    (tmp_path / "empty.c").write_text("int sdlite_test_symbol(void) { return 0; }\n")
    runtime = tmp_path / "other" / "libgomp-1234abcd.so.1"
    runtime.parent.mkdir()
    compiler = os.environ.get("CXX") or "c++"
    for command in ([compiler, "-x", "c", "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o", str(runtime),
                     f"-Wl,-soname,{runtime.name}"],
                    [compiler, "-x", "c", "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o",
                     str(tmp_path / "libtorch_cpu.so"), "-Wl,--no-as-needed", "-x", "none", str(runtime)]):
        subprocess.run(command, check=True, capture_output=True)
    maps = _maps_lines(["/opt/conda/lib/libiomp5.so", str(runtime), str(tmp_path / "libtorch_cpu.so")])
    assert cpu_kernels.openmp_runtime(maps) == runtime
    assert cpu_kernels.openmp_runtimes(maps)[0].name == "libiomp5.so"  # which is mapped first
