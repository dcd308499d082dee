"""3x3 convolutions by Winograd's F(2x2, 3x3) and F(4x4, 3x3) (sdlite.ops.winograd_conv3x3, transforms
in sdlite/csrc/winograd.cpp): the same convolution, taken by exactly the convs the rule names, with the
tile size it names, and a packed conv's weight laid out plain for them and packed again for other
shapes."""

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
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", {4: 8, 2: 8})
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 4)


@pytest.fixture
def taken(monkeypatch):
    """The input shapes ``ops.winograd_conv3x3`` is called with, in order (it still computes)."""
    shapes = []
    winograd = ops.winograd_conv3x3
    monkeypatch.setattr(ops, "winograd_conv3x3", lambda x, *a: shapes.append(tuple(x.shape)) or winograd(x, *a))
    return shapes


@pytest.fixture
def tiles_used(monkeypatch):
    """The side of the output tiles of each input transform the kernel runs, in order: 2 or 4, told by
    the size of the Winograd domain it writes (16 or 36 positions)."""
    kernel = cpu_kernels.load_winograd()
    if kernel is None:
        pytest.skip("sdlite's Winograd kernel cannot be built here")
    used = []
    transform = kernel.input
    monkeypatch.setattr(kernel, "input", lambda x, v, *a: used.append(kernel.TILES[v.shape[0]]) or transform(x, v, *a))
    return used


def _reference(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


# Largest error against an fp64 conv, over the output's largest value, per tile size. Measured: F(2x2)
# 5e-8..3e-7, F(4x4) 1.5e-7..1.3e-6 here and 2.0e-6..2.5e-6 on the UNet's 320- and 640-channel convs,
# where oneDNN's direct convolution is off by 3.8e-6..4.7e-6 (session 27).
TOLERANCE = {2: 2e-6, 4: 5e-6}


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("n, cin, cout, h, w, bias, chunk, block", [
    (2, 8, 16, 6, 10, True, None, None),
    (1, 3, 5, 1, 1, False, None, None),  # one tile, all but one of its output pixels past the edge
    (3, 13, 7, 9, 5, True, None, None),  # odd sizes: the last tile row and column are cut
    (2, 16, 48, 10, 14, True, 5, 16),  # tiles in chunks of 5, output channels in blocks of 16
    (1, 64, 80, 7, 12, False, 3, 64),  # blocks of 64 output channels and 16 left over
])
def test_winograd_conv3x3_is_the_convolution_to_fp32_rounding(monkeypatch, tile, n, cin, cout, h, w, bias, chunk,
                                                              block):
    """max |winograd - fp64 conv| <= TOLERANCE[tile] * max |ref|, channels-last output, for any map size,
    with and without bias, in chunks of tiles and blocks of output channels."""
    positions = (tile + 2) ** 2
    if chunk:
        monkeypatch.setattr(ops, "WINOGRAD_CHUNK_BYTES", 4 * positions * max(cin, cout) * chunk)
        monkeypatch.setattr(ops, "WINOGRAD_MIN_CHUNK", 1)
    if block:
        monkeypatch.setattr(ops, "WINOGRAD_WEIGHT_BYTES", 4 * positions * cin * block)
        monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) * (9 * cin) ** -0.5
    b = torch.randn(cout, generator=g) if bias else None
    ref = _reference(x, weight, b)
    got = ops.winograd_conv3x3(x, weight, b, tile)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got.double() - ref).abs().max() <= TOLERANCE[tile] * ref.abs().max()
    # a channels-last input is the same input
    again = ops.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, b, tile)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_the_rule_picks_4x4_tiles_where_there_are_enough_then_2x2_then_none():
    """The default rule (``ops.WINOGRAD_MIN_TILES``) on the UNet's maps at batch 2 and 1 (64x64 latents:
    maps of 64, 32, 16, 8), the VAE decoder's and odd sizes (tiles cover the edge)."""
    assert ops.WINOGRAD_MIN_TILES == {4: 64, 2: 64}
    assert [ops.winograd_tile(2, s, s) for s in (64, 32, 16, 8)] == [4, 4, 2, None]
    assert [ops.winograd_tile(1, s, s) for s in (64, 32, 16, 8)] == [4, 4, 2, None]
    assert ops.winograd_tile(1, 512, 512) == 4
    assert ops.winograd_tile(1, 29, 29) == 4  # 8 x 8 tiles of 4x4, the last row and column cut
    assert ops.winograd_tile(1, 28, 28) == 2  # 7 x 7 of 4x4, 14 x 14 of 2x2
    assert ops.winograd_tile(2, 12, 11) == 2  # 2 x 6 x 6 of 2x2
    assert ops.winograd_tile(1, 15, 15) == 2  # 8 x 8 of 2x2, 4 x 4 of 4x4
    assert ops.winograd_tile(1, 14, 14) is None  # 7 x 7 of 2x2: 64 is the least


@needs_kernel
def test_a_conv_takes_winograd_exactly_where_the_rule_says(monkeypatch, small_rule, taken, tiles_used):
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", {4: 8, 2: 16})
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

    def tile(x):
        """The tile side the conv ran by, or None: oneDNN's direct convolution."""
        tiles_used.clear()
        return tiles_used[0] if takes(x) else None

    assert tile(torch.randn(1, 4, 8, 16, generator=g)) == 4  # 8 tiles of 4x4
    assert tile(torch.randn(2, 4, 8, 8, generator=g)) == 4  # 8 tiles of 4x4 over the batch
    assert tile(torch.randn(1, 4, 8, 8, generator=g)) == 2  # 4 of 4x4, 16 of 2x2
    assert tile(torch.randn(4, 4, 4, 4, generator=g)) == 2  # the same over the batch
    assert tile(torch.randn(1, 4, 7, 7, generator=g)) == 2  # cut tiles count: 4 of 4x4, 16 of 2x2
    assert tile(torch.randn(1, 4, 6, 8, generator=g)) is None  # 4 of 4x4, 12 of 2x2
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
    large, small = torch.randn(2, 8, 6, 6, generator=g), torch.randn(1, 8, 4, 4, generator=g)  # 8 and 1 tiles of 4x4
    with torch.no_grad():
        ops.pack(conv)
        assert conv.packed and not conv.weight.is_mkldnn  # plain until its first call
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
    with pytest.raises(ValueError, match="16 or 36"):  # 25 positions: no algorithm of the kernel's
        kernel.input(x.contiguous(memory_format=torch.channels_last), torch.empty(25, 4, 8), 0)
    with pytest.raises(ValueError, match="2 or 4"):
        ops.winograd_conv3x3(x, torch.randn(4, 8, 3, 3), None, 3)


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


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_upsample_computed_in_fp32_takes_4x4_tiles_as_an_fp32_one_does(monkeypatch, small_rule, tiles_used,
                                                                             dtype):
    """Half weights on a CPU without native half kernels compute in fp32 (ops.HALF_AS_FP32): their
    upsamples take F(4x4) on the upsampled map where fp32 ones do, not the phases (session 30)."""
    if dtype not in ops.HALF_AS_FP32:
        pytest.skip(f"this CPU computes {dtype} natively")
    conv = ops.Conv2d(8, 8, 3, padding=1).requires_grad_(False).to(dtype)
    x = torch.randn(2, 8, 5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        out = ops.upsample_conv(x, conv)
    assert tiles_used == [4] and not hasattr(conv, "_phase_cache") and out.dtype == dtype
    ref = _reference(F.interpolate(x.float(), scale_factor=2.0, mode="nearest"), conv.weight.float(), conv.bias.float())
    assert (out.double() - ref).abs().max() <= 2.0 ** -7 * ref.abs().max()  # one bf16/fp16 rounding of the sums


@needs_kernel
@pytest.mark.parametrize("packed", [False, True])
def test_an_upsample_whose_conv_takes_4x4_tiles_convolves_the_upsampled_map_and_caches_nothing(
        monkeypatch, small_rule, tiles_used, packed):
    """``ops.upsample_conv``: F(4x4, 3x3) on the upsampled map does 9 multiply-adds per small-map pixel
    and channel pair, the four 2x2 phase convs 16; F(2x2, 3x3) does 16 too, so there the phases stay.
    The upsampled map is never made: the input transform reads each small pixel for its 2x2 block."""
    if packed and torch.float32 not in ops.ONEDNN_GEMM:
        pytest.skip("needs PyTorch's oneDNN ops (x86)")
    monkeypatch.setattr(ops, "WINOGRAD_MIN_TILES", {4: 4, 2: 4})
    interpolations = []
    interpolate = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: interpolations.append(a[0].shape) or interpolate(*a, **k))
    g = torch.Generator().manual_seed(0)
    conv = ops.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    plain_weight = conv.weight.clone()
    if packed:
        ops.pack(conv)

    def upsample(x):
        tiles_used.clear()
        conv.__dict__.pop("_phase_cache", None)
        with torch.no_grad():
            out = ops.upsample_conv(x, conv)
        ref = _reference(interpolate(x, scale_factor=2.0, mode="nearest"), plain_weight, conv.bias)
        assert out.shape == ref.shape and (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        return tiles_used[:], hasattr(conv, "_phase_cache")

    x = torch.randn(2, 8, 5, 3, generator=g)  # 10 x 6 upsampled: 2 x 3 x 2 tiles of 4x4, cut at the edges
    assert upsample(x) == ([4], False) and not interpolations
    assert not conv.weight.is_mkldnn  # (packed: laid out plain for Winograd, for the upsampled shape)
    assert upsample(torch.randn(1, 8, 2, 2, generator=g)) == ([], True)  # 4x4: 1 of 4x4, 4 of 2x2: phases
    assert conv._phase_cache[3].is_mkldnn == packed  # packed for oneDNN though the conv's weight is plain now
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())
    assert upsample(x) == ([], True) and not interpolations
