"""sdlite.ops: the backend choices change which kernel runs, never the result."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdlite.ops as ops

from factory import TINY_SD1, random_networks


needs_onednn = pytest.mark.skipif(torch.float32 not in ops.ONEDNN_GEMM, reason="oneDNN's GEMM needs an x86 CPU and a PyTorch with oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 77, 768), (40, 3), (2, 5, 7, 16)])
def test_linear_through_onednn_equals_pytorchs_linear(shape):
    g = torch.Generator().manual_seed(0)
    layer = ops.Linear(shape[-1], 24)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        ours = layer(x)
        reference = F.linear(x, layer.weight, layer.bias)  # PyTorch's BLAS (MKL) path
        xs = torch.randn(shape[-1], *shape[:-1], generator=g).movedim(0, -1)  # a non-contiguous input
        assert not xs.is_contiguous()
        strided, strided_reference = layer(xs), F.linear(xs, layer.weight, layer.bias)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, strided_reference, rtol=1e-5, atol=1e-5)


def test_linear_takes_onednn_only_for_fp32_inference(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "ONEDNN_GEMM", frozenset({torch.float32}))
    monkeypatch.setattr(ops, "_gemm", lambda x, w, b: calls.append(x.dtype) or F.linear(x, w, b))
    layer = ops.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)  # fp32, no gradient: oneDNN
        layer.double()(x.double())  # float64: PyTorch's kernel
    assert calls == [torch.float32]
    layer.float()
    layer(x).sum().backward()  # gradients recorded: PyTorch's kernel (the oneDNN op has no backward)
    assert calls == [torch.float32] and layer.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast: PyTorch's kernel, which autocast casts for
    monkeypatch.setattr(ops, "ONEDNN_GEMM", frozenset())  # another CPU or build: PyTorch's kernel
    with torch.no_grad():
        layer(x)
    assert calls == [torch.float32]


@needs_onednn
@pytest.mark.parametrize("batch, c_in, c_out, hw, kernel, padding", [
    (2, 512, 8, 8, 3, 1), (2, 64, 1280, 4, 3, 1), (1, 16, 24, 5, 3, 1),
    (2, 16, 12, 7, 2, 1),  # upsample_conv's 2x2 phase kernels with padding 1
    (1, 8, 8, 6, 1, 0), (2, 8, 8, 5, 3, 0)])
def test_conv2d_as_im2col_gemm_equals_the_oneDNN_convolution(batch, c_in, c_out, hw, kernel, padding, monkeypatch):
    monkeypatch.setattr(ops, "GEMM_CONV_MAX_ROWS", {torch.float32: 10**6})  # every convolution through the GEMM
    monkeypatch.setattr(ops, "GEMM_CONV_MIN_OUT", 0)
    gemm = []
    monkeypatch.setattr(ops, "_conv_as_gemm", lambda *a, real=ops._conv_as_gemm: gemm.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(c_in, c_out, kernel, padding=padding)
    x = torch.randn(batch, c_in, hw, hw, generator=g)
    with torch.no_grad():
        ours = conv(x)
        reference = F.conv2d(x, conv.weight, conv.bias, padding=padding)  # oneDNN, PyTorch's default
    assert gemm == [1]
    assert ours.shape == reference.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in ops.ONEDNN_GEMM, reason="needs a CPU with native bf16 (AVX512-BF16/AMX)")
def test_bf16_linear_and_conv_through_onednn_match_pytorchs_native_bf16_kernels(monkeypatch):
    # Both accumulate in fp32 and round once to bf16; only the order of the sums differs.
    monkeypatch.setattr(ops, "GEMM_CONV_MAX_ROWS", {torch.bfloat16: 10**6})
    monkeypatch.setattr(ops, "GEMM_CONV_MIN_OUT", 0)
    g = torch.Generator().manual_seed(5)
    layer, conv = ops.Linear(64, 48).bfloat16(), ops.Conv2d(32, 24, 3, padding=1).bfloat16()
    x, m = torch.randn(2, 9, 64, generator=g).bfloat16(), torch.randn(2, 32, 6, 6, generator=g).bfloat16()
    with torch.no_grad():
        pairs = [(layer(x), F.linear(x, layer.weight, layer.bias)),
                 (conv(m), F.conv2d(m, conv.weight, conv.bias, padding=1))]
    for ours, native in pairs:
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), native.float(), rtol=2.0 ** -7, atol=2e-2)


@needs_onednn
@pytest.mark.parametrize("shape, keys, chunk", [((2, 3, 50, 16), 50, None), ((1, 2, 37, 8), 64, 10),
                                               ((1, 1, 300, 24), 300, None), ((2, 2, 33, 8), 33, 33),
                                               ((1, 1, 300, 4), 9000, None)])  # default chunks: 128, 128, 44
def test_attention_over_many_keys_by_gemm_equals_sdpa(shape, keys, chunk, monkeypatch):
    monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", 32)  # small tensors through the GEMM path
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())  # not the C++ kernel (tests/test_cpu_kernels.py)
    g = torch.Generator().manual_seed(6)
    b, heads, length, d = shape
    q = torch.randn(b, length, heads, d, generator=g).transpose(1, 2)  # the UNet's strided heads
    k, v = (torch.randn(b, heads, keys, d, generator=g) for _ in range(2))
    with torch.no_grad():
        ours = ops.attention(q, k, v, chunk)
        reference = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_half_attention_without_native_kernels_runs_sdpa_in_fp32_and_rounds_once(monkeypatch):
    # Where neither the C++ kernel nor the GEMM path takes it (an AVX2 CPU), half attention on a CPU
    # without native half kernels computes in fp32, as the convolutions and linear layers do there.
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset({torch.bfloat16, torch.float16}))
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
    monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", None)
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v))
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        for half in (torch.bfloat16, torch.float16):
            out = ops.attention(q.to(half), k.to(half), v.to(half), query_chunk=16)
            ref = sdpa(*(t.to(half).float() for t in (q, k, v)))
            assert out.dtype == half and torch.equal(out, ref.to(half))  # fp32 arithmetic, one rounding
        ops.attention(q, k, v)
    assert seen == [torch.float32] * 3 * 2 + [torch.float32]  # three query chunks of 16, twice; fp32 as is


@needs_onednn
@pytest.mark.skipif(torch.bfloat16 not in ops.ONEDNN_GEMM, reason="needs native bf16 GEMM kernels")
@pytest.mark.parametrize("heads, d", [(4, 40), (1, 128)])
def test_bf16_attention_by_gemm_is_as_accurate_as_sdpas_bf16_kernel(heads, d, monkeypatch):
    # Scores and softmax in fp32, the probabilities rounded to bf16 for the product with v: the
    # arithmetic of SDPA's own bf16 kernel, so its mean error against fp64 must be no larger (the
    # largest single error is a noisy statistic: 0.9-1.8x SDPA's on these shapes). The GEMM path,
    # not the C++ kernel that takes bf16 first where it is built (tests/test_cpu_kernels.py).
    monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", 32)
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, heads, 600, d, generator=g).bfloat16() for _ in range(3))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        ours, sdpa = ops.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == torch.bfloat16
    err_ours, err_sdpa = ((x.double() - exact).abs().mean().item() for x in (ours, sdpa))
    assert err_ours <= 1.1 * err_sdpa, (err_ours, err_sdpa)


@needs_onednn
def test_the_low_memory_query_chunk_never_makes_the_gemm_chunks_larger(monkeypatch):
    # The default chunk holds ~2^20 scores (256 queries at 4096 keys); a larger low-memory chunk
    # (pipe.set_low_memory: 1024 queries) must not raise it, a smaller one lowers it.
    rows = []
    gemm = ops._gemm
    monkeypatch.setattr(ops, "_gemm", lambda x, w, b: rows.append(x.shape[0]) or gemm(x, w, b))
    q, k, v = (torch.randn(1, 1, n, 8) for n in (600, 4096, 4096))
    with torch.no_grad():
        for chunk, largest in ((None, 256), (1024, 256), (100, 100)):
            rows.clear()
            ops._attention_by_gemm(q, k, v, chunk)
            assert max(rows) == largest, chunk


def test_attention_takes_the_gemm_path_only_for_many_keys_in_fp32_inference(monkeypatch):
    monkeypatch.setattr(ops, "ONEDNN_GEMM", frozenset({torch.float32, torch.bfloat16}))
    monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", 64)
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())  # bf16 would take the C++ kernel first where it is built
    seen = []
    monkeypatch.setattr(ops, "_attention_by_gemm", lambda q, k, v, c: seen.append(k.shape[-2]) or q)
    q = torch.randn(1, 2, 8, 4)
    with torch.no_grad():
        ops.attention(q, torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4))  # 64 keys: GEMM
        ops.attention(q, torch.randn(1, 2, 63, 4), torch.randn(1, 2, 63, 4))  # cross-attention to few keys: SDPA
        kv = torch.randn(1, 2, 64, 4).bfloat16()
        assert ops.attention(q.bfloat16(), kv, kv).dtype == torch.bfloat16  # bf16: scores in fp32, the result in bf16
        kv = torch.randn(1, 2, 64, 4).double()
        ops.attention(q.double(), kv, kv)  # float64: SDPA
    qg = q.clone().requires_grad_()
    ops.attention(qg, torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4))  # gradients recorded: SDPA
    assert seen == [64, 64]


def test_rowwise_on_the_cpu_computes_chunks_of_rows_and_gives_the_unchunked_result(monkeypatch):
    monkeypatch.setattr(ops, "ROW_CHUNK", 7)
    w = torch.randn(5, 3)
    calls: list[int] = []

    def per_row(r: torch.Tensor) -> torch.Tensor:
        calls.append(r.shape[:-1].numel())
        return F.gelu(r @ w.t())

    x = torch.randn(2, 11, 3)  # 22 rows: 7 + 7 + 7 + 1
    out = ops.rowwise(per_row, x)
    assert calls == [7, 7, 7, 1]
    assert out.shape == (2, 11, 5)
    torch.testing.assert_close(out, F.gelu(x @ w.t()), rtol=0, atol=1e-6)
    calls.clear()
    assert ops.rowwise(per_row, x[:, :3]).shape == (2, 3, 5) and calls == [6]  # few rows: one call


def test_rowwise_leaves_other_devices_and_torch_compile_to_one_call(monkeypatch):
    monkeypatch.setattr(ops, "ROW_CHUNK", 2)
    calls: list[tuple[int, ...]] = []
    out = ops.rowwise(lambda r: calls.append(tuple(r.shape)) or r * 2, torch.randn(4, 6, 3, device="meta"))
    assert calls == [(4, 6, 3)] and out.shape == (4, 6, 3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops.rowwise(lambda r: calls.append(tuple(r.shape)) or r * 2, torch.randn(4, 6, 3))
    assert calls == [(4, 6, 3), (4, 6, 3)]


def test_conv2d_takes_the_gemm_only_for_small_maps_with_many_channels(monkeypatch):
    # The policy on an x86 CPU with native bf16 kernels, whatever this one has:
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset({torch.float16}))
    monkeypatch.setattr(ops, "ONEDNN_GEMM", frozenset({torch.float32, torch.bfloat16}))
    monkeypatch.setattr(ops, "GEMM_CONV_MAX_ROWS", {torch.float32: 256, torch.bfloat16: 256})
    monkeypatch.setattr(ops, "GEMM_CONV_LARGE_K", {torch.float32: (512, 11520), torch.bfloat16: (512, 17280)})
    monkeypatch.setattr(ops, "GEMM_CONV_MIN_OUT", 1280)
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())  # (on AVX2 CPUs only, where it takes the 16x16 maps here)
    seen = []
    monkeypatch.setattr(ops, "_conv_as_gemm", lambda x, *a: seen.append(tuple(x.shape)) or torch.zeros(()))
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", lambda self, x, *a: seen.append("oneDNN"))
    wide = ops.Conv2d(1280, 1280, 3, padding=1)  # rows of 1280 * 3 * 3 = 11520
    with torch.no_grad():
        ops.Conv2d(64, 1280, 3, padding=1)(torch.randn(2, 64, 8, 8))  # 2*8*8 = 128 rows: GEMM
        ops.Conv2d(64, 1280, 2, padding=1)(torch.randn(2, 64, 8, 8))  # 2*9*9 = 162 rows: GEMM
        ops.Conv2d(64, 1280, 3, padding=1)(torch.randn(2, 64, 16, 16))  # 512 short rows: oneDNN's conv
        wide(torch.randn(2, 1280, 16, 16))  # 512 rows of 11520: GEMM in fp32
        wide.bfloat16()(torch.randn(2, 1280, 16, 16).bfloat16())  # ... but not in bf16 (>= 17280)
        wide.bfloat16()(torch.randn(2, 1280, 8, 8).bfloat16())  # 128 rows in bf16: GEMM
        wide.float()(torch.randn(4, 1280, 16, 16))  # 1024 rows: oneDNN's conv
        ops.Conv2d(64, 640, 3, padding=1)(torch.randn(1, 64, 8, 8))  # few output channels: oneDNN's conv
        ops.Conv2d(64, 1280, 3, padding=1, stride=2)(torch.randn(1, 64, 8, 8))  # strided: oneDNN's conv
        ops.Conv2d(64, 1280, 3, padding=1).double()(torch.randn(1, 64, 8, 8).double())  # float64: oneDNN's conv
        ops.Conv2d(64, 1280, 3, padding=1)(torch.randn(64, 8, 8))  # unbatched: oneDNN's conv
        with torch.autocast("cpu", torch.bfloat16):
            ops.Conv2d(64, 1280, 3, padding=1)(torch.randn(1, 64, 8, 8))  # autocast: oneDNN's conv
    assert seen == [(2, 64, 8, 8), (2, 64, 8, 8), "oneDNN", (2, 1280, 16, 16), "oneDNN", (2, 1280, 8, 8), "oneDNN",
                    "oneDNN", "oneDNN", "oneDNN", "oneDNN", "oneDNN"]
    seen.clear()
    conv = ops.Conv2d(64, 1280, 3, padding=1)
    conv(torch.randn(1, 64, 8, 8))  # gradients recorded (training): oneDNN's conv, which has a backward
    monkeypatch.setattr(ops, "GEMM_CONV_MAX_ROWS", {})  # the switch off (CPUs not measured)
    monkeypatch.setattr(ops, "GEMM_CONV_LARGE_K", {})
    with torch.no_grad():
        conv(torch.randn(1, 64, 8, 8))
    assert seen == ["oneDNN", "oneDNN"]


# sdlite.ops.upsample_conv: nearest x2 + 3x3 conv computed as four 2x2 convs on the small map.

def _upsample_then_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The original formulation (CompVis ``Upsample``): upsample first, then the 3x3 conv."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)


@pytest.mark.parametrize("shape, out_channels", [((2, 8, 5, 7), 11), ((1, 16, 1, 1), 16), ((3, 4, 6, 6), 4),
                                                 ((1, 32, 16, 16), 32)])
def test_upsample_conv_equals_upsampling_then_the_3x3_conv(shape, out_channels):
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(shape[1], out_channels, 3, padding=1)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        ours = ops.upsample_conv(x, conv)
        reference = _upsample_then_conv(x, conv)
    assert ours.shape == (shape[0], out_channels, 2 * shape[2], 2 * shape[3])
    # Same sums over the same products; the summed kernel taps round differently (fp32 ulps).
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_upsample_conv_keeps_the_input_layout_with_the_strides_pytorch_expects(batch):
    # A batch of one once came back channels-last with a batch stride that PyTorch's GroupNorm and
    # conv do not take for channels-last: each copied the map to NCHW (15% of a 512x512 VAE decode).
    conv = ops.Conv2d(8, 6, 3, padding=1)
    for layout in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(batch, 8, 5, 7).contiguous(memory_format=layout)
        with torch.no_grad():
            out = ops.upsample_conv(x, conv)
        assert out.stride() == torch.empty(out.shape, memory_format=layout).stride(), (layout, out.stride())
        torch.testing.assert_close(out, _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)


def test_upsample_conv_follows_a_change_of_weights():
    """The summed kernels are cached for inference: loading new weights must not reuse stale ones."""
    conv = ops.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        before = ops.upsample_conv(x, conv)
        conv.load_state_dict({"weight": torch.randn(4, 4, 3, 3), "bias": torch.randn(4)})  # in-place copy
        after = ops.upsample_conv(x, conv)
        torch.testing.assert_close(after, _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
        conv.bias.zero_()  # the bias alone, in place
        torch.testing.assert_close(ops.upsample_conv(x, conv), _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
        conv.to(torch.float64)  # new parameter tensors
        torch.testing.assert_close(ops.upsample_conv(x.double(), conv), _upsample_then_conv(x.double(), conv))
    assert not torch.equal(before, after)


@needs_onednn
def test_a_packed_upsample_conv_follows_its_plain_weight_changed_in_place():
    # A packed conv keeps its plain weight until a call lays it out (ops.Conv2d.pack), and an
    # upsample that runs by phases never does: an in-place change must reach the phase kernels.
    conv = ops.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    ops.pack(conv)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ops.upsample_conv(x, conv)
        conv.weight.mul_(2)
        assert conv.packed and not conv.weight.is_mkldnn
        after = ops.upsample_conv(x, conv)
        torch.testing.assert_close(after, _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_upsample_conv_follows_weights_changed_through_data():
    """``.data`` changes (an EMA swap, a LoRA merged in place) move no version counter; the cached
    kernels must follow them all the same (they did not: errors of 3.5 against outputs of 2.9)."""
    conv = ops.Conv2d(32, 32, 3, padding=1).eval().requires_grad_(False)
    x = torch.randn(1, 32, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ops.upsample_conv(x, conv)
        conv.weight.data.copy_(torch.randn(32, 32, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.05)
        after = ops.upsample_conv(x, conv)
        torch.testing.assert_close(after, _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
        conv.weight.data[3, 7, 1, 2] += 0.5  # one value
        torch.testing.assert_close(ops.upsample_conv(x, conv), _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
        conv.bias.data.add_(1)
        torch.testing.assert_close(ops.upsample_conv(x, conv), _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


@needs_onednn
def test_a_packed_upsample_conv_follows_its_laid_out_weight_changed_in_place(monkeypatch):
    """A conv laid out by a direct call (oneDNN's layout), then used by upsample_conv: an in-place change
    of that weight reaches both paths."""
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())  # (a conv that runs by Winograd is never laid out)
    conv = ops.Conv2d(32, 32, 3, padding=1).eval().requires_grad_(False)
    ops.pack(conv)
    x = torch.randn(1, 32, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conv(torch.randn(1, 32, 12, 10))
        ops.upsample_conv(x, conv)
        assert conv.weight.is_mkldnn
        conv.weight.mul_(2)
        plain = conv.weight.to_dense().reshape(32, 32, 3, 3)
        ref = F.conv2d(F.interpolate(x, scale_factor=2.0), plain, conv.bias, padding=1)
        torch.testing.assert_close(ops.upsample_conv(x, conv), ref, rtol=1e-5, atol=1e-5)


def test_upsample_conv_gradients_equal_the_original_formulation():
    """Training goes through the summed kernels too (uncached): the gradients are those of the original."""
    g = torch.Generator().manual_seed(1)
    conv = ops.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 4, 5, generator=g, requires_grad=True)
    grads = [torch.autograd.grad(f(x, conv).square().sum(), [x, conv.weight, conv.bias])
             for f in (ops.upsample_conv, _upsample_then_conv)]
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    assert not hasattr(conv, "_phase_cache")  # nothing cached while gradients flow


def test_upsample_conv_runs_the_phases_only_on_the_listed_device_types(monkeypatch):
    assert ops.UPSAMPLE_BY_PHASES == ("cpu",)  # the default: the CPU only (no gain measured on a GPU)
    seen = []
    real = torch.nn.Conv2d._conv_forward

    def spy(self, input, weight, bias):
        seen.append((tuple(input.shape), tuple(weight.shape)))
        return real(self, input, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    conv = ops.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        for setting in ((), ("cuda",), ("cpu",)):  # off; on, but not for this (CPU) tensor; on
            monkeypatch.setattr(ops, "UPSAMPLE_BY_PHASES", setting)
            ops.upsample_conv(torch.randn(1, 3, 4, 4), conv)
    original, phases = ((1, 3, 8, 8), (2, 3, 3, 3)), ((1, 3, 4, 4), (8, 3, 2, 2))
    assert seen == [original, original, phases]


def test_upsample_conv_kernels_cached_under_inference_mode_serve_a_later_call_with_autograd():
    conv = ops.Conv2d(4, 4, 3, padding=1).requires_grad_(False)  # a frozen network
    with torch.inference_mode():
        ops.upsample_conv(torch.randn(1, 4, 3, 3), conv)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)  # e.g. a gradient with respect to the input
    (grad,) = torch.autograd.grad(ops.upsample_conv(x, conv).sum(), [x])
    (reference,) = torch.autograd.grad(_upsample_then_conv(x, conv).sum(), [x])
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5)


def test_upsample_conv_under_torch_compile_traces_the_original_formulation(monkeypatch):
    """The compiler gets the plain graph (no cache lookups, which would break it at every Upsample)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    conv = ops.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        out = ops.upsample_conv(torch.ones(1, 3, 4, 4), conv)
    assert out.shape == (1, 2, 8, 8) and not hasattr(conv, "_phase_cache")


# Half precision on a CPU without native half kernels: convolutions and matmuls in fp32, rounded once.

HALF = [torch.bfloat16, torch.float16]


def _half_modules(dtype):
    g = torch.Generator().manual_seed(1)
    conv = ops.Conv2d(16, 8, 3, padding=1).to(dtype)
    lin = ops.Linear(16, 24).to(dtype)
    x = torch.randn(2, 16, 6, 6, generator=g).to(dtype)
    return conv, lin, x


@pytest.mark.parametrize("dtype", HALF)
def test_half_conv_and_linear_compute_in_fp32_and_round_once_where_the_cpu_lacks_half_kernels(dtype, monkeypatch):
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset(HALF))  # the policy of an AVX2 CPU, whatever this one is
    seen = []
    real = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, i, w, b: seen.append((i.dtype, w.dtype)) or real(self, i, w, b))
    conv, lin, x = _half_modules(dtype)
    tokens = x.flatten(2).transpose(1, 2)  # [2, 36, 16]
    with torch.no_grad():
        y, z = conv(x), lin(tokens)
        y_ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).to(dtype)
        z_ref = F.linear(tokens.float(), lin.weight.float(), lin.bias.float()).to(dtype)
        # A native half kernel (PyTorch's reference loop here; tiny tensors) does the same arithmetic:
        # exact products, fp32 sums, one rounding; only the order of the sums may differ.
        y_native = F.conv2d(x, conv.weight, conv.bias, padding=1)
        z_native = F.linear(tokens, lin.weight, lin.bias)
    assert seen == [(torch.float32, torch.float32)]
    assert y.dtype == z.dtype == dtype
    assert torch.equal(y, y_ref) and torch.equal(z, z_ref)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one unit in the last place, relative
    torch.testing.assert_close(y, y_native, rtol=ulp, atol=1e-3)
    torch.testing.assert_close(z, z_native, rtol=ulp, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_half_conv_and_linear_run_the_half_kernels_where_the_cpu_has_them(dtype, monkeypatch):
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset())  # a CPU with AVX512-BF16/AMX
    monkeypatch.setattr(ops, "ONEDNN_GEMM", frozenset())  # and PyTorch's own kernels for its matmuls
    conv, lin, x = _half_modules(dtype)
    tokens = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert torch.equal(lin(tokens), F.linear(tokens, lin.weight, lin.bias))


def test_half_upsample_conv_sums_its_taps_in_fp32_and_matches_the_original_formulation(monkeypatch):
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset(HALF))
    g = torch.Generator().manual_seed(2)
    conv = ops.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 5, 7, generator=g)
    with torch.no_grad():
        reference = _upsample_then_conv(x, conv)  # fp32 throughout
        conv.to(torch.bfloat16)
        ours = ops.upsample_conv(x.bfloat16(), conv)
    assert ours.dtype == torch.bfloat16
    # bf16 weights and input: ~3 significant decimal digits.
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2)


def test_no_network_keeps_a_plain_linear_layer():
    # Every matmul of the three networks goes through sdlite.ops (so half weights stay fast on
    # CPUs without half kernels); the state-dict names are nn.Linear's.
    from tests.factory import TINY_SD1, TINY_SD2
    from sdlite.checkpoint import build_networks
    for cfg in (TINY_SD1, TINY_SD2):
        for name, model in build_networks(cfg).items():
            plain = [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
            assert not plain, (cfg.version, name, plain[:3])


def test_half_weights_reuse_one_fp32_buffer_without_mixing_layers_up(monkeypatch):
    # The fp32 copy of each weight is written into one reused per-thread buffer (no fresh memory
    # mapping per call); a small layer after a large one, and the large one again, must each see
    # their own weight.
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset(HALF))
    torch.manual_seed(3)  # the layers' initialisation, whatever ran before
    g = torch.Generator().manual_seed(3)
    big, small = ops.Linear(64, 32).bfloat16(), ops.Linear(8, 4).bfloat16()
    xb, xs = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(3, 8, generator=g).bfloat16()

    def fresh(layer, x):
        # The same fp32 product from fresh fp32 copies. Not F.linear, nor a call where a gradient
        # is recorded: where sdlite's fp32 products take oneDNN's GEMM, PyTorch's (MKL) differs in
        # the last bits, and ~1 seed in 300 then rounds to another bf16 value.
        return ops.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()

    with torch.inference_mode():  # no gradient: both sides take the same GEMM
        outs = [big(xb), small(xs), big(xb), small(xs)]
        assert all(torch.equal(o, fresh(layer, x)) for o, (layer, x) in
                   zip(outs, [(big, xb), (small, xs), (big, xb), (small, xs)]))


def test_half_weights_with_gradients_get_their_own_fp32_copy(monkeypatch):
    # Autograd keeps the fp32 weight for the backward pass, so a shared buffer would corrupt it.
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset(HALF))
    g = torch.Generator().manual_seed(4)
    a, b = ops.Linear(16, 16).bfloat16(), ops.Linear(16, 16).bfloat16()
    x = torch.randn(4, 16, generator=g).bfloat16().requires_grad_()
    b(a(x)).float().square().sum().backward()
    a32, b32 = (torch.nn.Linear(16, 16) for _ in range(2))
    with torch.no_grad():
        for m32, m in ((a32, a), (b32, b)):
            m32.weight.copy_(m.weight.float()), m32.bias.copy_(m.bias.float())
    x32 = x.detach().float().requires_grad_()
    b32(a32(x32).bfloat16().float()).bfloat16().float().square().sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.weight.grad.float(), a32.weight.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_half_layers_pass_gradients_to_their_input(monkeypatch, dtype):
    """A frozen half model differentiated for its input (guidance, embedding optimisation): the fp32 weight
    autograd keeps for the input's gradient must not be the shared buffer the next layer overwrites."""
    monkeypatch.setattr(ops, "HALF_AS_FP32", frozenset(HALF))
    torch.manual_seed(5)
    a, b = (ops.Linear(16, 16).to(dtype).requires_grad_(False) for _ in range(2))
    conv = ops.Conv2d(3, 3, 3, padding=1).to(dtype).requires_grad_(False)
    x = torch.randn(4, 16).to(dtype).requires_grad_()
    b(a(x)).float().sum().backward()
    expected = (b.weight.float() @ a.weight.float()).sum(0)  # d/dx of sum(B(Ax + a) + b), per row
    torch.testing.assert_close(x.grad.float(), expected.expand(4, -1), rtol=2e-2, atol=2e-2)
    m = torch.randn(1, 3, 5, 5).to(dtype).requires_grad_()
    (conv(m) + conv(2 * m)).float().sum().backward()  # the same conv twice: its first weight copy kept
    ones = torch.ones(1, 3, 5, 5, requires_grad=True)
    torch.nn.functional.conv2d(ones, conv.weight.float(), padding=1).sum().backward()
    torch.testing.assert_close(m.grad.float(), 3 * ones.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_groupnorm_records_statistics_and_reuses_them_on_another_input(dtype):
    # Tiled VAE decoding: statistics recorded on one input normalise another (sdlite.ops.GroupNorm).
    g = torch.Generator().manual_seed(7)
    norm = ops.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g)), norm.bias.copy_(torch.randn(8, generator=g))
    whole, tile = torch.randn(2, 8, 6, 5, generator=g), 0.1 * torch.randn(2, 8, 3, 4, generator=g) + 0.5
    with torch.no_grad(), ops.shared_statistics(norm) as set_mode:
        set_mode("record")
        recorded = norm(whole.to(dtype))
        set_mode("reuse")
        reused = norm(tile.to(dtype))
    plain = F.group_norm(whole.to(dtype), 4, norm.weight.to(dtype), norm.bias.to(dtype), eps=1e-6)
    grouped = whole.to(dtype).double().reshape(2, 4, -1)
    mean, var = grouped.mean(-1), grouped.var(-1, unbiased=False)  # [B, G]
    per_channel = lambda t: t.repeat_interleave(2, dim=1)[:, :, None, None]  # noqa: E731
    expected = ((tile.to(dtype).double() - per_channel(mean)) / (per_channel(var) + 1e-6).sqrt()
                * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None])
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2.0 ** -7, atol=2e-2),
           torch.float16: dict(rtol=2.0 ** -10, atol=3e-3)}[dtype]
    assert recorded.dtype == reused.dtype == dtype
    torch.testing.assert_close(recorded.float(), plain.float(), **tol)
    torch.testing.assert_close(reused.double(), expected.to(dtype).double(), **tol)
    assert norm.stats is None and norm.recorded is None  # back to normal on exit


def test_onednn_gemm_is_off_where_the_internal_op_is_missing_or_fails(monkeypatch):
    # torch.ops.mkldnn._linear_pointwise is internal to PyTorch: a build without it, or where it
    # raises, gets PyTorch's own kernels instead of an error at the first linear layer.
    import types
    monkeypatch.setattr(ops.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    assert not ops._onednn_gemm_works(torch.float32)

    def broken(*args):
        raise RuntimeError("unsupported")
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_linear_pointwise=broken))
    assert not ops._onednn_gemm_works(torch.float32)
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace(_linear_pointwise=lambda x, w, b, *a: x[:, :1]))
    assert not ops._onednn_gemm_works(torch.float32)  # a wrong answer
    monkeypatch.undo()
    monkeypatch.setattr(ops.platform, "machine", lambda: "aarch64")
    assert not ops._onednn_gemm_works(torch.float32)  # not x86: PyTorch's defaults (unmeasured there)
    monkeypatch.undo()
    assert ops._onednn_gemm_works(torch.float32) == (torch.float32 in ops.ONEDNN_GEMM)


# Packed weights (ops.pack): oneDNN's blocked layout, the same layers and the same results.

def _tiny_networks():
    return random_networks(TINY_SD1, seed=3)


def _run_networks(nets, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    ctx = torch.randn(2, 77, 32, generator=g).to(dtype)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        return (nets["unet"](x, torch.tensor([10.0, 500.0]), ctx).float(), nets["vae"].decode(x).float(),
                nets["text_encoder"](ids).float())


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_networks_compute_what_the_plain_ones_do(dtype, monkeypatch):
    """Tiny UNet (3x3, 1x1 and stride-2 convs, the Upsample's phase kernels, attention, GEGLU), VAE and
    text encoder: packed, every output within float rounding of the plain networks'
    (fp32: 1e-5 of the max; bf16, whose rounding is 2^-8: 3e-2)."""
    if dtype not in ops.ONEDNN_GEMM:
        pytest.skip("this CPU has no native bf16 kernels: bf16 weights are not packed")
    # Every conv through oneDNN: a conv that runs by Winograd lays its weight out plain instead
    # (tests/test_winograd.py), which the last line would count as unpacked.
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())
    nets = _tiny_networks()
    for net in nets.values():
        net.to(dtype)
    plain = _run_networks(nets, dtype)
    for net in nets.values():
        ops.pack(net)
    layers = [m for net in nets.values() for m in net.modules() if isinstance(m, (ops.Linear, ops.Conv2d))]
    packed = [m for m in layers if m.packed]
    assert {m.packable for m in layers if not m.packed} == {False}  # only GEGLU's proj is left out
    assert len(packed) > 0.8 * len(layers)
    for a, b in zip(_run_networks(nets, dtype), plain):
        assert ((a - b).abs().max() / b.abs().max()).item() <= (1e-5 if dtype == torch.float32 else 3e-2)
    assert all(m.packed for m in packed)  # a forward that can take them keeps them packed,
    # and each in oneDNN's layout once it has run (an Upsample's conv runs as its phase kernels)
    ran = [m for m in packed if not isinstance(m, ops.Conv2d) or m._packed_for != ()]
    assert all(m.weight.is_mkldnn for m in ran) and len(ran) > 0.7 * len(layers)


@needs_onednn
def test_packed_layers_give_plain_state_dicts_and_unpack_for_anything_else():
    nets = _tiny_networks()
    unet = nets["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ops.pack(unet)
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert unet.input_blocks[1][1].proj_in.weight.dim() == 2  # a 1x1 conv, packed as a linear layer
    for k, v in after.items():  # plain strided tensors, equal bit for bit, 1x1 convs back in 4-D
        assert v.layout == torch.strided and v.shape == before[k].shape and torch.equal(v, before[k]), k
    # load_state_dict unpacks, then loads
    unet.load_state_dict({k: v + 1 for k, v in before.items()})
    assert not any(p.is_mkldnn for p in unet.parameters())
    assert torch.equal(unet.out[2].weight, before["out.2.weight"] + 1)
    # .to() / .double() unpack first
    ops.pack(unet)
    unet.double()
    assert not any(p.is_mkldnn for p in unet.parameters()) and unet.out[2].weight.dtype == torch.float64


@needs_onednn
def test_a_packed_layer_unpacks_itself_where_autograd_needs_the_plain_weight():
    lin, conv = ops.Linear(8, 4), ops.Conv2d(3, 5, 3, padding=1)
    for m in (lin, conv):
        m.requires_grad_(False)
        ops.pack(m)
        assert m.packed
    x, img = torch.randn(2, 8, requires_grad=True), torch.randn(1, 3, 6, 6, requires_grad=True)
    y, z = lin(x), conv(img)
    assert not lin.packed and not conv.packed and not lin.weight.is_mkldnn and not conv.weight.is_mkldnn
    assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-6)
    assert torch.allclose(z, F.conv2d(img, conv.weight, conv.bias, padding=1), atol=1e-6)
    (y.sum() + z.sum()).backward()
    assert x.grad is not None and img.grad is not None


@needs_onednn
def test_a_packed_model_made_trainable_is_refused_at_its_first_step_and_trains_once_unpacked():
    """requires_grad_(True) on a loaded model: an optimizer built then holds the packed tensors, which
    unpacking would replace, so its steps would update nothing (98 of 133 UNet weights did not change,
    without an error). The forward refuses, naming the remedy; after ops.unpack every weight trains."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(ops.Conv2d(3, 8, 3, padding=1), ops.Conv2d(8, 8, 1), nn.Flatten(), ops.Linear(8 * 36, 4))
    net.requires_grad_(False)
    ops.pack(net)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        net(x)  # the 3x3 conv laid out for x
    assert all(m.weight.is_mkldnn for m in net if isinstance(m, ops._Packable))
    net.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"call sdlite.ops.unpack\(model\) before requires_grad_\(True\)"):
        net(x).square().sum().backward()
    ops.unpack(net)
    assert all(p.requires_grad for p in net.parameters())  # unpacking keeps what the user asked for
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    net(x).square().sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


@needs_onednn
def test_a_packed_conv_whose_weight_needs_gradients_is_not_laid_out_even_without_autograd():
    """A no_grad forward (a validation step) must not swap a trainable weight for a laid-out copy."""
    conv = ops.Conv2d(3, 8, 3, padding=1).requires_grad_(False)
    ops.pack(conv)
    conv.requires_grad_(True)
    weight = conv.weight
    with torch.no_grad():
        conv(torch.randn(1, 3, 6, 6))
    assert conv.weight is weight and not conv.packed


@needs_onednn
def test_unpack_drops_the_packed_phase_kernels_so_the_module_can_be_copied():
    """upsample_conv packs its phase kernels for a packed conv whose own weight stays plain; unpack and
    .to() must drop them too (deepcopy failed on them, and after .to("meta") they still held CPU memory)."""
    conv = ops.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    ops.pack(conv)
    x = torch.randn(1, 8, 2, 2)  # 4x4 upsampled: runs by phases
    with torch.no_grad():
        ops.upsample_conv(x, conv)
    assert conv._phase_cache[3].is_mkldnn and not conv.weight.is_mkldnn
    ops.unpack(conv)
    assert not hasattr(conv, "_phase_cache")
    copy.deepcopy(conv)
    with torch.no_grad():
        ops.upsample_conv(x, conv)
    assert hasattr(conv, "_phase_cache")
    conv.to(torch.float64)
    assert not hasattr(conv, "_phase_cache")


def test_upsample_conv_follows_a_flipped_kernel_changed_through_data():
    """A .data edit that keeps each output channel's sum (a flipped kernel) must still reach the cached
    phase kernels (it did not: an error of 2.5 on outputs of 2)."""
    conv = ops.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-8, 9, conv.weight.shape, generator=torch.Generator().manual_seed(0)) / 64)
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ops.upsample_conv(x, conv)
        conv.weight.data.copy_(conv.weight.data.flip(-1))  # (flip copies)
        torch.testing.assert_close(ops.upsample_conv(x, conv), _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)
        conv.weight.data.copy_(conv.weight.data.transpose(-1, -2).clone())
        torch.testing.assert_close(ops.upsample_conv(x, conv), _upsample_then_conv(x, conv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean, spread", [(20.0, 0.5), (1000.0, 10.0), (0.0, 1.0)])
def test_group_norm_of_a_channels_last_map_is_accurate_where_its_mean_dwarfs_its_spread(mean, spread):
    """PyTorch's CPU group norm reads a channels-last map (what packed convs return) in one pass and
    cancels E[x²] − E[x]² in fp32; sdlite shifts such groups by their mean first. Against fp64."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 64, 128, 128, generator=g) * spread + mean).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
    ours = ops.group_norm(x, 32, w, b, 1e-6)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours.double() - ref).abs().max() < 1e-4
    if mean:  # the reason: PyTorch's own kernel on the same map
        assert (F.group_norm(x, 32, w, b, 1e-6).double() - ref).abs().max() > 1e-3


def test_a_tiled_decode_on_one_thread_leaves_the_same_norms_normal_on_another():
    norm = ops.GroupNorm(4, 8, eps=1e-6)
    x = torch.randn(1, 8, 5, 5)
    inside, done = threading.Event(), threading.Event()

    def tiled():
        with torch.no_grad(), ops.shared_statistics(norm) as set_mode:
            set_mode("record")
            norm(torch.randn(1, 8, 5, 5) * 3 + 2)
            set_mode("reuse")
            inside.set()
            done.wait(30)

    t = threading.Thread(target=tiled)
    t.start()
    try:
        assert inside.wait(30)
        assert norm.stats is None  # on this thread
        with torch.no_grad():
            torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))
    finally:
        done.set()
        t.join(30)


@needs_onednn
def test_pack_leaves_weights_that_need_gradients_or_have_no_onednn_kernel():
    trained, fp64 = ops.Linear(8, 4), ops.Conv2d(3, 5, 3).double().requires_grad_(False)
    ops.pack(trained)
    ops.pack(fp64)
    assert not trained.weight.is_mkldnn and trained.weight.requires_grad  # a model being trained
    assert not fp64.weight.is_mkldnn  # fp64: no oneDNN kernel


@needs_onednn
def test_a_packed_conv_is_packed_again_for_each_new_input_shape_and_computes_the_same(monkeypatch):
    # oneDNN picks a conv weight's layout by the input's batch and map size; with a weight packed
    # for another shape it reorders the whole weight on every call (seconds per UNet step on an
    # AVX2 CPU). So a packed conv lays its weight out at its first call, and again when the input's
    # shape changes, and only then; upsample_conv's phase kernels are packed for the shape of the
    # map they run on.
    laid_out = []
    reorder = ops._reorder_conv
    monkeypatch.setattr(ops, "_reorder_conv", lambda *a: laid_out.append(a[-1]) or reorder(*a))
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    up = ops.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    inputs = [torch.randn(shape, generator=g) for shape in ((2, 8, 5, 5), (2, 8, 5, 5), (1, 8, 3, 7), (2, 8, 5, 5))]
    with torch.no_grad():
        plain = [conv(x) for x in inputs]
        plain_up = [ops.upsample_conv(x, up) for x in inputs]
        ops.pack(conv), ops.pack(up)
        assert laid_out == [] and conv.packed and up.packed  # plain until the first call
        packed = [conv(x) for x in inputs]
        packed_up = [ops.upsample_conv(x, up) for x in inputs]
    assert conv.weight.is_mkldnn and up.packed and not up.weight.is_mkldnn  # up runs as its phase kernels
    assert laid_out == [(2, 5, 5), (1, 3, 7), (2, 5, 5)] * 2  # once per change of shape, for each conv
    for a, b in zip(packed + packed_up, plain + plain_up):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the same sums in another order


@needs_onednn
def test_pack_gives_the_freed_plain_weights_back_every_release_every_bytes(monkeypatch):
    # 4 linear layers of 4096 bytes each (32x32 fp32), a release after every 8192 bytes replaced:
    # after the 2nd and the 4th; a 5th layer already packed replaces nothing; a 6th leaves a
    # remainder, released at the end.
    calls = []
    monkeypatch.setattr(ops, "release_free_memory", lambda: calls.append(len(calls)))
    monkeypatch.setattr(ops, "RELEASE_EVERY", 8192)
    layers = [ops.Linear(32, 32).requires_grad_(False) for _ in range(4)]
    done = ops.pack(ops.Linear(32, 32).requires_grad_(False))
    assert len(calls) == 1  # the remainder of that single layer
    calls.clear()
    ops.pack(torch.nn.Sequential(*layers, done, ops.Linear(32, 16).requires_grad_(False)))
    assert len(calls) == 3


def test_release_free_memory_finds_malloc_trim_in_glibc_and_is_a_no_op_elsewhere():
    import platform

    ops.release_free_memory()
    assert callable(ops._MALLOC_TRIM) == (platform.libc_ver()[0] == "glibc")


@needs_onednn
@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sdlite_load_packs_every_layer_whether_or_not_the_file_needs_converting(tmp_path, file_dtype):
    # A file already in the target dtype is used as it is (memory-mapped); its layers are packed all the same.
    import sdlite
    from test_pipeline import make_pipe

    from factory import TINY_SD1

    path = sdlite.save(make_pipe(), tmp_path / "tiny.safetensors", dtype=file_dtype)
    for target in [t for t in (torch.float32, torch.bfloat16) if t in ops.ONEDNN_GEMM]:
        pipe = sdlite.load(path, device="cpu", dtype=target, config=TINY_SD1)
        for net in (pipe.unet, pipe.vae, pipe.text_encoder):
            layers = [m for m in net.modules() if isinstance(m, ops._Packable)]
            plain = [m for m in layers if not m.packed and m.pack()]  # what a later pack would still do
            assert layers and not plain, (file_dtype, target, type(net).__name__, len(plain))


@needs_onednn
def test_the_loader_releases_the_file_pages_of_a_weight_it_packed_without_converting(monkeypatch):
    # A file already in the target dtype is used as it is; once a layer's weight is packed, the file
    # tensor is no longer used, and its pages are dropped (release) like those of a converted tensor.
    from sdlite.checkpoint import networks_from_state_dict

    from factory import TINY_SD1, original_state_dict

    released = []
    packer = ops.Packer()
    _, nets = networks_from_state_dict(original_state_dict(TINY_SD1), {}, path="x", device="cpu",
                                       dtype=torch.float32, config=TINY_SD1, release=released.append, finish=packer)
    packed = [m for net in nets.values() for m in net.modules() if isinstance(m, ops._Packable) and m.weight.is_mkldnn]
    assert packed and len(released) == len(packed)
    assert all(t.dtype == torch.float32 and t.dim() >= 2 for t in released)
    # A 3x3 conv keeps the file's weight until its first call lays it out; then that one goes too.
    conv = nets["vae"].decoder.conv_in
    weight = conv.weight
    assert conv.packed and not weight.is_mkldnn and conv._release_file is not None
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(ops, "WINOGRAD_CONV", ())  # (one that runs by Winograd reads the plain weight: nothing to release)
        conv(torch.randn(1, conv.in_channels, 4, 4))
    assert conv.weight.is_mkldnn and released[-1] is weight and len(released) == len(packed) + 1
    # Once unpacked, a plain file weight is the caller's: packed and laid out again, it is not released.
    other = nets["vae"].decoder.conv_out
    assert other._release_file is not None
    other.unpack()
    ops.pack(other)
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(ops, "WINOGRAD_CONV", ())
        other(torch.randn(1, other.in_channels, 4, 4))
    assert other.weight.is_mkldnn and len(released) == len(packed) + 1


@needs_onednn
def test_sdlite_load_packs_the_cpu_networks_and_save_writes_plain_weights(tmp_path):
    import sdlite
    from safetensors.torch import load_file

    pipe = sdlite.load(device="cpu")
    assert pipe.unet.input_blocks[0][0].packed and pipe.vae.decoder.conv_in.packed
    out = tmp_path / "resaved.safetensors"
    sdlite.save(pipe, out)
    saved = load_file(out)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(saved[key], pipe.unet.state_dict()["input_blocks.0.0.weight"].to(saved[key].dtype))
