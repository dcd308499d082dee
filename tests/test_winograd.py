"""3x3 convolutions by Winograd's F(2x2, 3x3) (sdlite.ops.winograd_conv3x3, transforms in
sdlite/csrc/winograd.cpp): the same convolution, taken by exactly the convs the rule names, with a
packed conv's weight laid out plain for them and packed again for other shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sdlite import cpu_kernels, ops

needs_kernel = pytest.mark.skipif(not cpu_kernels.isas(), reason="sdlite's C++ kernels build on x86-64 Linux only")


@pytest.fixture
def small_rule(monkeypatch):
    """The rule scaled down to test-sized convs, and on wherever the kernel builds (it is on for AVX2 CPUs)."""
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ("cpu",))
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 8)
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 4)


@pytest.fixture
def taken(monkeypatch):
    """The input shapes ``ops.winograd_conv3x3`` is called with, in order (it still computes)."""
    shapes = []
    winograd = ops.winograd_conv3x3
    monkeypatch.setattr(ops, "winograd_conv3x3", lambda x, w, b: shapes.append(tuple(x.shape)) or winograd(x, w, b))
    return shapes


def _reference(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


@needs_kernel
@pytest.mark.parametrize("n, cin, cout, h, w, bias, chunk_bytes, weight_bytes", [
    (2, 8, 16, 6, 10, True, None, None),
    (1, 3, 5, 1, 1, False, None, None),  # one tile, three of its four output pixels past the edge
    (3, 13, 7, 9, 5, True, None, None),  # odd sizes: the last tile row and column are cut
    (2, 16, 48, 10, 14, True, 64 * 16 * 5, 64 * 16 * 16),  # tiles in chunks of 5, output channels in blocks of 16
    (1, 64, 80, 7, 12, False, 64 * 80 * 3, 64 * 64 * 64),  # blocks of 64 output channels and 16 left over
])
def test_winograd_conv3x3_is_the_convolution_to_fp32_rounding(monkeypatch, n, cin, cout, h, w, bias, chunk_bytes,
                                                              weight_bytes):
    """max |winograd - fp64 conv| <= 2e-6 * max |ref| (measured 3e-7..1e-6; oneDNN's direct conv 2e-6..6e-6 on
    the UNet's convs), channels-last output, for any map size, with and without bias, in chunks of tiles
    and blocks of output channels."""
    if chunk_bytes:
        monkeypatch.setattr(ops, "WINOGRAD_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(ops, "WINOGRAD_MIN_CHUNK", 1)
    if weight_bytes:
        monkeypatch.setattr(ops, "WINOGRAD_WEIGHT_BYTES", weight_bytes)
        monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) * (9 * cin) ** -0.5
    b = torch.randn(cout, generator=g) if bias else None
    ref = _reference(x, weight, b)
    got = ops.winograd_conv3x3(x, weight, b)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    # a channels-last input is the same input
    again = ops.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, b)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@needs_kernel
def test_a_conv_takes_winograd_exactly_where_the_rule_says(monkeypatch, small_rule, taken):
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", 16)
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(4, 8, 3, padding=1).requires_grad_(False)

    def takes(x, module=conv):
        taken.clear()
        with torch.no_grad():
            out = module(x)
        ref = F.conv2d(x.double(), module.weight.double(), module.bias.double(), module.stride, module.padding,
                       module.dilation)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        return bool(taken)

    assert takes(torch.randn(1, 4, 8, 8, generator=g))  # 16 tiles
    assert not takes(torch.randn(1, 4, 6, 8, generator=g))  # 12 tiles
    assert takes(torch.randn(4, 4, 4, 4, generator=g))  # 16 tiles over the batch
    assert not takes(torch.randn(1, 3, 8, 8, generator=g), ops.Conv2d(3, 8, 3, padding=1).requires_grad_(False))
    assert not takes(torch.randn(1, 4, 8, 8, generator=g), ops.Conv2d(4, 3, 3, padding=1).requires_grad_(False))
    assert not takes(torch.randn(1, 4, 16, 16, generator=g), ops.Conv2d(4, 8, 3, padding=1, stride=2).requires_grad_(False))
    assert not takes(torch.randn(1, 4, 8, 8, generator=g), ops.Conv2d(4, 8, 3, padding=2, dilation=2).requires_grad_(False))
    assert not takes(torch.randn(1, 4, 8, 8, generator=g), ops.Conv2d(4, 8, 5, padding=2).requires_grad_(False))
    assert not takes(torch.randn(1, 4, 8, 8, generator=g).double(), ops.Conv2d(4, 8, 3, padding=1).double().requires_grad_(False))
    # a gradient to record: PyTorch's conv, which has a backward
    trained = ops.Conv2d(4, 8, 3, padding=1)
    taken.clear()
    trained(torch.randn(1, 4, 8, 8, generator=g)).sum().backward()
    assert not taken and trained.weight.grad is not None
    # bf16 on a CPU without native bf16 kernels is computed in fp32: by Winograd too
    if torch.bfloat16 in ops.HALF_AS_FP32:
        half = ops.Conv2d(4, 8, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
        taken.clear()
        with torch.no_grad():
            out = half(torch.randn(1, 4, 8, 8, generator=g).to(torch.bfloat16))
        assert taken and out.dtype == torch.bfloat16
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())  # --no-fused-kernels, and CPUs where it is off
    assert not takes(torch.randn(1, 4, 8, 8, generator=g))


@needs_kernel
@pytest.mark.skipif(torch.float32 not in ops.ONEDNN_GEMM, reason="needs PyTorch's oneDNN ops (x86)")
def test_a_packed_conv_lays_its_weight_out_plain_for_winograd_and_packed_for_other_shapes(small_rule, taken):
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    plain_weight = conv.weight.clone()
    large, small = torch.randn(2, 8, 6, 6, generator=g), torch.randn(1, 8, 4, 4, generator=g)  # 18 and 4 tiles
    with torch.no_grad():
        ops.pack(conv)
        assert conv.weight.is_mkldnn
        outs = [conv(large)]
        assert not conv.weight.is_mkldnn and taken == [(2, 8, 6, 6)]  # laid out plain: Winograd reads it
        outs.append(conv(small))
        assert conv.weight.is_mkldnn and len(taken) == 1  # packed again, for oneDNN at this shape
        outs.append(conv(large))
        assert not conv.weight.is_mkldnn and len(taken) == 2
    for out, x in zip(outs, (large, small, large)):
        ref = _reference(x, plain_weight, conv.bias)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(conv.state_dict()["weight"], plain_weight, rtol=0, atol=0)  # plain, whole, either way
    conv.unpack()
    taken.clear()
    with torch.no_grad():
        conv(small)
    assert not conv.weight.is_mkldnn and conv._packed_for is None  # unpacked for good
    torch.testing.assert_close(conv.weight, plain_weight, rtol=0, atol=0)


@needs_kernel
def test_the_winograd_kernel_rejects_tensors_it_would_misread():
    kernel = cpu_kernels.load_winograd()
    assert kernel is not None
    x = torch.randn(1, 8, 4, 4)  # NCHW: the transforms read channels-last
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.input(x, torch.empty(16, 4, 8), 0)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.weights(torch.randn(4, 8, 3, 3).double(), torch.empty(16, 4, 8))
    with pytest.raises(ValueError, match="not in the output"):
        kernel.output(torch.empty(16, 4, 8), None, torch.empty(1, 8, 4, 4, memory_format=torch.channels_last), 0, 4)


@needs_kernel
def test_without_a_compiler_winograd_is_off_with_one_warning_and_convs_run_direct(monkeypatch, tmp_path, small_rule):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("SDLITE_CACHE_DIR", str(tmp_path))
    cpu_kernels.load_winograd.cache_clear()
    try:
        conv = ops.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
        x = torch.randn(2, 8, 6, 6)
        with pytest.warns(RuntimeWarning, match="Winograd convolution kernel is not available.*no C\\+\\+ compiler"):
            with torch.no_grad():
                out = conv(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            with torch.no_grad():
                conv(x)
        ref = _reference(x, conv.weight, conv.bias)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        cpu_kernels.load_winograd.cache_clear()
