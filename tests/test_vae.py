"""Tests for sdlite.vae: shapes on a tiny config, the checkpoint layout at full size, and numerical
parity with diffusers' AutoencoderKL (an independent implementation) at full size in fp64 and fp32."""

from __future__ import annotations

import gc

import pytest
import torch

from sdlite import ops
from sdlite.config import VAEConfig
from sdlite.vae import AutoencoderKL, DiagonalGaussian

from factory import every_conv_by_winograd, tsv_shapes

PREFIX = "first_stage_model."
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded, non-degenerate weights: convs ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
    norm scales ~ 1 + N(0, 0.1^2), so that every parameter (norms and biases too) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    randomize_(model, seed=1)
    return model


# --- tiny config -------------------------------------------------------------------------------


def test_tiny_encode_32px_gives_16px_latent_and_decode_restores_image_shape(tiny: AutoencoderKL) -> None:
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(image)
        assert isinstance(posterior, DiagonalGaussian)
        for t in (posterior.mean, posterior.logvar, posterior.std, posterior.var, posterior.mode()):
            assert t.shape == (2, 4, 16, 16)
        assert torch.equal(posterior.mode(), posterior.mean)
        out = tiny.decode(posterior.sample(torch.Generator().manual_seed(0)))
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all()


def test_tiny_encode_does_not_modify_input(tiny: AutoencoderKL) -> None:
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    before = image.clone()
    with torch.no_grad():
        tiny.decode(tiny.encode(image).mean)
    assert torch.equal(image, before)


def test_sample_is_deterministic_under_a_seeded_generator_and_differs_across_seeds(tiny: AutoencoderKL) -> None:
    with torch.no_grad():
        posterior = tiny.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    a = posterior.sample(torch.Generator().manual_seed(42))
    b = posterior.sample(torch.Generator().manual_seed(42))
    c = posterior.sample(torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The noise is exactly mean + std * randn(generator), drawn in fp32 on the generator's device.
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(a, posterior.mean + posterior.std * eps, rtol=0, atol=0)


def test_logvar_is_clamped_to_minus30_plus20_and_std_var_follow_it() -> None:
    mean = torch.zeros(1, 4, 2, 2)
    logvar = torch.tensor([-100.0, -30.0, 0.0, 50.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    expected = torch.tensor([-30.0, -30.0, 0.0, 20.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert torch.equal(posterior.logvar, expected)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * expected))
    torch.testing.assert_close(posterior.var, torch.exp(expected))
    assert torch.isfinite(posterior.sample(torch.Generator().manual_seed(0))).all()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)], ids=["fp16", "bf16"])
def test_tiny_encode_decode_in_half_precision_is_within_1e_2_fp16_6e_2_bf16_of_fp32_max_abs(
    tiny: AutoencoderKL, dtype: torch.dtype, tolerance: float
) -> None:
    """max |half - fp32| <= tolerance * max |fp32| for decode(encode(image).mean). Measured over 30
    weight/image seeds: fp16 1.7e-3..5.3e-3, bf16 1.3e-2..4.6e-2 (these seeds: fp16 3.4e-3, bf16 2.4e-2)."""
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    half = AutoencoderKL(TINY).eval()
    half.load_state_dict(tiny.state_dict())
    half.to(dtype)
    with torch.no_grad():
        ref = tiny.decode(tiny.encode(image).mean)
        out = half.decode(half.encode(image.to(dtype)).mean)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= tolerance * ref.abs().max()


# --- full size (SD) layout ----------------------------------------------------------------------


def test_full_size_is_built_on_meta_with_exactly_the_sd1_and_sd2_first_stage_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == tsv_shapes("sd1.tsv", PREFIX)
    assert ours == tsv_shapes("sd2.tsv", PREFIX)
    assert list(model.buffers()) == []


def test_model_built_on_meta_loads_a_state_dict_with_strict_assign() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(TINY)
    sd = {k: torch.zeros(s) for k, s in ((k, v.shape) for k, v in AutoencoderKL(TINY).state_dict().items())}
    model.load_state_dict(sd, strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())


# --- numerical parity with diffusers (full size, fp64 and fp32) -------------------------------


def diffusers_sd_vae(ours: AutoencoderKL):
    """diffusers.AutoencoderKL with the SD config, holding OUR weights (in their dtype, no copy)
    converted by diffusers' own single-file converter (the path it uses for original ``.ckpt`` files)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(ref.config))
    ref.load_state_dict(converted, strict=True, assign=True)
    return ref.eval()


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype, tolerance, winograd", [(torch.float64, 1e-10, False), (torch.float32, 5e-5, False),
                                                       (torch.float32, 5e-5, True)],
                         ids=["fp64", "fp32", "fp32-every-conv-by-winograd"])
def test_full_size_matches_diffusers_decode_and_encode_within_1e_10_of_max_abs_in_fp64_and_5e_5_in_fp32(
    dtype: torch.dtype, tolerance: float, winograd: bool, monkeypatch
) -> None:
    """decode(z) of a [1,4,8,8] latent vs diffusers ``decode(z).sample`` (both include
    post_quant_conv), and encode of a [1,3,64,64] image: mean and logvar vs diffusers
    ``latent_dist.mean/.logvar`` (both include quant_conv). Tolerance: max abs diff <= tolerance * max |ref|.

    fp64 proves the same formula, every constant included: measured <= 8.3e-15, while GroupNorm
    eps 1e-5 instead of 1e-6 gives 1.2e-5..2.2e-5, which fp32 rounding would hide (fp32: 1.6e-5..2.4e-5
    mutated). fp32 (measured 6.0e-6 decode, 3.1e-6 mean, 3.8e-6 logvar) proves our fp32 path rounds
    no worse than diffusers'. ``fp32-every-conv-by-winograd``: every 3x3 stride-1 conv of ours by
    Winograd's F(4x4, 3x3), the less accurate of its two tile sizes (by default, on AVX2 CPUs, only
    large maps take it: ``ops.WINOGRAD_MIN_TILES``); measured on an AVX2 CPU (session 27): 9.0e-6
    decode, 5.2e-6 mean, 5.0e-6 logvar, against 7.2e-6, 7.2e-6 and 4.8e-6 with the default choice
    there (session 25, every conv by F(2x2, 3x3): 7.2e-6, 4.2e-6, 4.2e-6)."""
    if winograd and not every_conv_by_winograd(monkeypatch):
        pytest.skip("sdlite's Winograd kernel cannot be built here (x86-64 Linux with a C++ compiler)")
    torch.manual_seed(0)
    ours = AutoencoderKL(VAEConfig()).eval()
    randomize_(ours, seed=1234)
    ours.to(dtype)
    ref = diffusers_sd_vae(ours)
    ops.pack(ours.requires_grad_(False))  # as sdlite.load runs it on the CPU (fp32: packed; fp64: as is)
    assert ours.decoder.conv_in.packed == (dtype in ops.ONEDNN_GEMM)
    assert next(ref.parameters()).dtype == dtype

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=dtype)
    image = torch.rand(1, 3, 64, 64, generator=g, dtype=dtype) * 2 - 1
    with torch.no_grad():
        dec_ours, dec_ref = ours.decode(z), ref.decode(z).sample
        post_ours, post_ref = ours.encode(image), ref.encode(image).latent_dist
    del ours, ref
    gc.collect()

    assert dec_ours.shape == dec_ref.shape == (1, 3, 64, 64)
    assert post_ours.mean.shape == post_ref.mean.shape == (1, 4, 8, 8)
    assert dec_ours.dtype == post_ours.mean.dtype == dtype
    # Non-degenerate: the outputs vary, so agreement is not trivial.
    for t in (dec_ref, post_ref.mean, post_ref.logvar):
        assert t.std() > 1e-3 * t.abs().max()
    assert max_rel_err(dec_ours, dec_ref) <= tolerance
    assert max_rel_err(post_ours.mean, post_ref.mean) <= tolerance
    assert max_rel_err(post_ours.logvar, post_ref.logvar) <= tolerance


def test_inference_writes_swish_and_residual_sums_in_place_without_changing_the_result(tiny, monkeypatch):
    # Without autograd the ResnetBlocks write into their own fresh tensors (fewer large allocations);
    # with autograd they keep the originals, which the backward pass needs. Same numbers either way
    # (with PyTorch's attention and convolutions on both sides: sdlite's CPU attention kernel and
    # Winograd convolutions run without autograd only).
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())
    g = torch.Generator().manual_seed(11)
    z, x = torch.randn(1, TINY.z_channels, 8, 8, generator=g), torch.randn(1, 3, 32, 32, generator=g)
    with torch.inference_mode():
        decoded, moments = tiny.decode(z), tiny.encoder(x)
    z_grad = z.clone().requires_grad_()
    with torch.enable_grad():
        decoded_grad = tiny.decode(z_grad)
        decoded_grad.square().mean().backward()
        moments_grad = tiny.encoder(x)
    assert torch.equal(decoded, decoded_grad.detach()) and torch.equal(moments, moments_grad.detach())
    assert z_grad.grad is not None and torch.isfinite(z_grad.grad).all()
    tiny.zero_grad(set_to_none=True)  # the module is shared by the other tests
