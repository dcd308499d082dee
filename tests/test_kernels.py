"""sdlite.kernels: the fused GroupNorm (+ SiLU) Triton kernels, and how sdlite.ops.group_norm picks them.

Without a GPU (CI) the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors: the same kernel code, indexing and masks, executed with numpy. With one, the compiled
kernels run on CUDA tensors. Either way they are held to a float64 ``F.group_norm`` reference.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Triton reads this when it is imported and when a kernel is decorated (sdlite.kernels' import),
# so it is set first, and stays set for the rest of this test process on a machine without a GPU.
# Nothing else there runs Triton: sdlite takes these kernels on CUDA only.
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
importlib.import_module("triton")  # a test extra: missing, this module fails rather than skips

from sdlite import kernels, ops  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def reference(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              silu: bool) -> torch.Tensor:
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(y) if silu else y


def assert_within_one_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 arithmetic, then one rounding to the output dtype: off by at most a few of its units
    in the last place (relative to the largest value, as SiLU outputs cross zero)."""
    eps = torch.finfo(y.dtype).eps
    scale = ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= 4 * eps * scale + (1e-6 * scale if y.dtype == torch.float32 else 0), (err, scale)


def map_(shape: tuple[int, ...], dtype: torch.dtype, layout: str, mean: float = 0.0, std: float = 1.0,
         seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return x.to(DEVICE).contiguous(memory_format=LAYOUTS[layout])


def affine(channels: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = 1 + 0.5 * torch.randn(channels, generator=g)
    b = 0.5 * torch.randn(channels, generator=g)
    return w.to(DEVICE, dtype), b.to(DEVICE, dtype)


@pytest.mark.parametrize("tile", [kernels.TILE_ELEMENTS, 32])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fused_kernels_equal_group_norm_and_silu_to_one_rounding(dtype, layout, silu, tile, monkeypatch):
    # 3 channels per group (padded to 4 inside a block), 7x9 pixels: masks on both axes; one tile
    # per group, or (32-element tiles) eight, the last one ragged. 8 groups (SD's 32 only multiply
    # the programs, which Triton's interpreter runs one by one).
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", tile)
    x = map_((2, 24, 7, 9), dtype, layout, mean=0.5, std=2.0)
    w, b = affine(24, dtype)
    y = kernels.group_norm(x, 8, w, b, 1e-5, silu=silu)
    assert y.dtype == dtype and y.stride() == x.stride()  # x's dtype and memory layout
    assert_within_one_rounding(y, reference(x, 8, w, b, 1e-5, silu))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_groups_split_into_many_tiles_merge_to_the_exact_statistics(layout, monkeypatch):
    # Tiles of 32 elements: a 20x21 map with 2 channels per group is 27 tiles, the last one ragged,
    # merged in a block of 32 (five slots masked off).
    # A mean of 1000 against a spread of 1: the variance as E[x²] - E[x]² in fp32 puts the
    # normalised map 0.35 off (cancellation); Chan's merge of per-tile (mean, M2) does not cancel.
    # The inputs' own fp32 spacing at 1000 is 6e-5; PyTorch's fp32 group_norm (NCHW) is 1.1e-4 off
    # here, these kernels 1.2e-4.
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 32)
    x = map_((1, 16, 20, 21), torch.float32, layout, mean=1000.0, std=1.0)
    w, b = affine(16, torch.float32)
    y = kernels.group_norm(x, 8, w, b, 1e-6, silu=False)
    ref = reference(x, 8, w, b, 1e-6, silu=False)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=3e-4)


def test_one_compiled_variant_serves_every_map_size_up_to_the_merge_block(monkeypatch):
    # Triton compiles a variant per set of compile-time constants (and per dtype and layout). They
    # follow from the channels per group and SiLU alone, not the map's size, as long as a group
    # has at most MERGE_TILES tiles: SD1.5's UNet maps (8x8 to 64x64 latents, 10 to 80 channels per
    # group) need one variant per channel count, not one per channel count and map size.
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **constants: launches.append((self.name, grid, constants))

    monkeypatch.setattr(kernels, "_tile_statistics", Recorder("statistics"))
    monkeypatch.setattr(kernels, "_normalize", Recorder("normalize"))
    w, b = torch.ones(320), torch.zeros(320)
    for side in (8, 16, 32, 64):
        kernels.group_norm(torch.empty(2, 320, side, side), 32, w, b, 1e-5, silu=True)
    constants = {(name, tuple(sorted(c.items()))) for name, _, c in launches}
    assert len(launches) == 8 and len(constants) == 2, constants  # one per kernel
    assert {grid for _, grid, _ in launches} == {(64, 1), (64, 4), (64, 16)}  # 8x8 and 16x16: one tile
    # Above MERGE_TILES tiles per group the merge block doubles: a variant per power of two.
    launches.clear()
    kernels.group_norm(torch.empty(1, 320, 128, 128), 32, w, b, 1e-5, silu=True)
    (_, grid, c), = [launch for launch in launches if launch[0] == "normalize"]
    assert grid == (32, 64) and c["TILES_POW2"] == 64 > kernels.MERGE_TILES


def test_maps_in_other_layouts_take_pytorchs_kernels(fused_here, monkeypatch):
    # A strided view (every other column) is neither NCHW nor channels-last: the kernels' offsets
    # assume one of those two, so ops.group_norm leaves it to PyTorch.
    x = map_((1, 64, 6, 12), torch.float32, "nchw")[..., ::2]
    assert not kernels.supports(x)
    w, b = affine(64, torch.float32)
    calls = count_kernel_calls(monkeypatch)
    y = ops.group_norm(x, 32, w, b, 1e-5, silu=True)
    assert not calls
    assert_within_one_rounding(y, reference(x, 32, w, b, 1e-5, silu=True))


def test_empty_tensors_are_left_to_pytorch(fused_here, monkeypatch):
    # Nothing to launch a kernel grid over: an empty batch takes PyTorch's ops, which return an empty result.
    norm_calls, gelu_calls = count_kernel_calls(monkeypatch), count_kernel_calls(monkeypatch, "gelu_product_")
    w, b = affine(64, torch.float32)
    with torch.no_grad():
        y = ops.group_norm(map_((0, 64, 4, 4), torch.float32, "nchw"), 32, w, b, 1e-5, silu=True)
        z = ops.gelu_product(torch.empty(0, 8, device=DEVICE), torch.empty(0, 8, device=DEVICE))
    assert y.shape == (0, 64, 4, 4) and z.shape == (0, 8) and not norm_calls and not gelu_calls


def test_gelu_halves_the_kernel_cannot_take_are_left_to_pytorch(fused_here, monkeypatch):
    # Its offsets assume two contiguous tensors of one shape and dtype: anything else takes PyTorch's ops.
    gelu_calls = count_kernel_calls(monkeypatch, "gelu_product_")
    g = torch.Generator(device=DEVICE).manual_seed(3)
    a = torch.randn(4, 16, device=DEVICE, generator=g)
    cases = [(a[:, ::2], a[:, 1::2]), (a, a.half()), (a[:, :8], a)]
    assert not any(kernels.supports_gelu_product(x, y) for x, y in cases)
    with torch.no_grad():
        out = ops.gelu_product(a[:, ::2].clone().t().contiguous().t(), a[:, 1::2].contiguous())  # non-contiguous a
        assert torch.equal(out, F.gelu(a[:, 1::2].contiguous()) * a[:, ::2])  # PyTorch's two passes
        assert kernels.supports_gelu_product(a[:, 1::2].contiguous(), a[:, ::2].contiguous())
    assert not gelu_calls


def test_half_maps_with_fp32_weights_are_normalised_in_fp32():
    x = map_((1, 64, 8, 8), torch.float16, "channels_last", mean=1.0, std=3.0)
    w, b = affine(64, torch.float32)
    y = kernels.group_norm(x, 32, w, b, 1e-5, silu=True)
    assert y.dtype == torch.float16
    assert_within_one_rounding(y, reference(x, 32, w, b, 1e-5, silu=True))


@pytest.fixture
def fused_here(monkeypatch):
    """ops.group_norm and ops.gelu_product take the fused kernels on this test's device."""
    monkeypatch.setattr(ops, "FUSED_GROUP_NORM", (DEVICE,))
    monkeypatch.setattr(ops, "FUSED_GELU", (DEVICE,))
    ops._fused_kernels.cache_clear()
    device = torch.empty(0, device=DEVICE).device  # "cuda:0": the key ops looks up
    for kernel in ("group_norm", "gelu_product"):
        assert ops._fused_kernels(kernel, device, torch.float32) is kernels  # built and ran once, here
    yield
    ops._fused_kernels.cache_clear()


def count_kernel_calls(monkeypatch, name: str = "group_norm") -> list[int]:
    calls = []
    original = getattr(kernels, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, name, counted)
    return calls


def test_ops_group_norm_takes_the_kernels_without_autograd_and_pytorchs_with_it(fused_here, monkeypatch):
    norm = ops.GroupNorm(32, 64, eps=1e-6).to(DEVICE)
    x = map_((2, 64, 6, 6), torch.float32, "channels_last")
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        fused = norm(x, silu=True)
    assert len(calls) == 1 and fused.is_contiguous(memory_format=torch.channels_last)
    plain = F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)

    # The kernels have no backward: with gradients wanted, PyTorch's group_norm runs.
    trained = norm(x.clone().requires_grad_(), silu=True)
    assert len(calls) == 1
    trained.sum().backward()
    assert norm.weight.grad is not None


def test_a_machine_where_the_kernels_cannot_build_falls_back_with_one_warning(fused_here, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(kernels, "group_norm", broken)
    ops._fused_kernels.cache_clear()
    x = map_((1, 64, 4, 4), torch.float32, "nchw")
    w, b = affine(64, torch.float32)
    with pytest.warns(RuntimeWarning, match="fused group_norm kernels do not run here.*C compiler"):
        y = ops.group_norm(x, 32, w, b, 1e-5, silu=True)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 32, w, b, 1e-5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, not on every call
        ops.group_norm(x, 32, w, b, 1e-5)


def test_tiny_unet_and_vae_give_pytorchs_output_through_the_fused_kernels(fused_here, monkeypatch):
    from factory import TINY_SD1, random_networks

    from sdlite.unet.model import GEGLU


    nets = random_networks(TINY_SD1, 0)
    unet, vae = nets["unet"].to(DEVICE), nets["vae"].to(DEVICE)
    g = torch.Generator().manual_seed(0)
    # A batch of one: Triton's interpreter (no GPU) runs a kernel's programs one by one, one per
    # sample and group, so a second sample doubles the time and proves nothing more.
    x = torch.randn(1, 4, 8, 8, generator=g).to(DEVICE)
    ctx = torch.randn(1, 77, TINY_SD1.unet.context_dim, generator=g).to(DEVICE)
    t = torch.tensor([500.0], device=DEVICE)
    calls, gelu_calls = count_kernel_calls(monkeypatch), count_kernel_calls(monkeypatch, "gelu_product_")
    # Full fp32 convolutions on CUDA: TF32 (cuDNN's default) would round each layer's inputs to 10
    # mantissa bits and turn 1e-7 differences into 1e-3 ones.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False), \
            torch.backends.cuda.matmul.flags(allow_tf32=False) if ON_GPU else contextlib.nullcontext():
        fused = unet(x, t, ctx), vae.decode(x)
        n_fused, n_gelu = len(calls), len(gelu_calls)
        monkeypatch.setattr(ops, "FUSED_GROUP_NORM", ())
        monkeypatch.setattr(ops, "FUSED_GELU", ())
        plain = unet(x, t, ctx), vae.decode(x)
    n_norms = sum(isinstance(m, ops.GroupNorm) for net in (unet, vae.decoder, vae.post_quant_conv)
                  for m in net.modules())
    n_geglu = sum(isinstance(m, GEGLU) for m in unet.modules())
    assert n_fused == len(calls) and n_fused >= n_norms  # every GroupNorm call went through them
    assert n_gelu == len(gelu_calls) == n_geglu > 0  # and every GEGLU
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_dtype_the_gpu_cannot_build_for_falls_back_alone(fused_here, monkeypatch):
    # Triton builds per dtype (bf16 needs a recent GPU): a failure for one dtype leaves the others fused.
    original = kernels.group_norm

    def no_bf16(x, *args, **kwargs):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("bf16 is not supported on this architecture")
        return original(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "group_norm", no_bf16)
    ops._fused_kernels.cache_clear()
    w, b = affine(64, torch.float32)
    with pytest.warns(RuntimeWarning, match="for torch.bfloat16"):
        y16 = ops.group_norm(map_((1, 64, 4, 4), torch.bfloat16, "nchw"), 32, w, b, 1e-5)
    assert y16.dtype == torch.bfloat16
    assert ops._fused_kernels("group_norm", torch.empty(0, device=DEVICE).device, torch.float32) is kernels
    calls = count_kernel_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.group_norm(map_((1, 64, 4, 4), torch.float32, "nchw"), 32, w, b, 1e-5)
    assert len(calls) == 1  # fp32 maps still take the kernels


# -- the GELU product (GEGLU's gate) ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_gelu_product_equals_a_times_gelu_to_one_rounding_in_place(dtype):
    # 3 x 7 x 50 = 1050 elements: a full block of 1024 and a ragged one. Gates from -6 to 6 cover
    # GELU's negative dip and its tails.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 7, 50, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    gate = (torch.rand(3, 7, 50, generator=g, dtype=torch.float64) * 12 - 6).to(dtype).to(DEVICE)
    ref = a.double() * F.gelu(gate.double())
    a_memory = a.data_ptr()
    y = kernels.gelu_product_(a, gate)
    assert y.data_ptr() == a_memory and y.dtype == dtype  # written over a
    assert_within_one_rounding(y, ref)


def test_ops_gelu_product_takes_the_kernel_without_autograd_and_pytorchs_with_it(fused_here, monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, gate = (torch.randn(2, 5, 64, generator=g).to(DEVICE) for _ in range(2))
    expected = a * F.gelu(gate)
    calls = count_kernel_calls(monkeypatch, "gelu_product_")
    with torch.no_grad():
        fused = ops.gelu_product(a.clone(), gate)
    assert len(calls) == 1
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)

    # The kernel has no backward: with gradients wanted, F.gelu and the product run.
    a_trained = a.clone().requires_grad_()
    trained = ops.gelu_product(a_trained, gate)
    assert len(calls) == 1
    trained.sum().backward()
    torch.testing.assert_close(a_trained.grad, F.gelu(gate))
    # A view (not contiguous) is left to PyTorch too.
    with torch.no_grad():
        strided = ops.gelu_product(a.clone()[..., ::2], gate[..., ::2])
    assert len(calls) == 1
    torch.testing.assert_close(strided, expected[..., ::2], rtol=1e-5, atol=1e-6)


def test_a_gelu_kernel_that_cannot_build_falls_back_alone(fused_here, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("erf is not supported")

    monkeypatch.setattr(kernels, "gelu_product_", broken)
    ops._fused_kernels.cache_clear()
    a, gate = torch.randn(4, 8).to(DEVICE), torch.randn(4, 8).to(DEVICE)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="fused gelu_product kernels do not run here.*erf"):
            y = ops.gelu_product(a.clone(), gate)
        torch.testing.assert_close(y, a * F.gelu(gate))
        assert ops._fused_kernels("group_norm", a.device, torch.float32) is kernels  # still builds and runs
        calls = count_kernel_calls(monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per device and dtype, not on every call
            ops.gelu_product(a.clone(), gate)
            ops.group_norm(map_((1, 64, 4, 4), torch.float32, "nchw"), 32, None, None, 1e-5)
    assert len(calls) == 1  # and GroupNorm takes it
