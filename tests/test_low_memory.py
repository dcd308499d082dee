"""The low-memory options change memory, not results: chunked attention equals plain attention,
and the tiled VAE decode assembles and blends tiles without seams."""

from __future__ import annotations

import pytest
import torch

from sdlite import devices, ops
from sdlite.ops import attention
from sdlite.clip import tokenizer_for
from sdlite.errors import ArgumentError
from sdlite.pipeline import Pipeline

from factory import TINY_SD1, random_networks


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    nets = random_networks(TINY_SD1, 0)
    return Pipeline(tokenizer_for(TINY_SD1.text), nets["text_encoder"], nets["unet"], nets["vae"], TINY_SD1,
                    devices.Precision(torch.device("cpu"), torch.float32), name="tiny")


@pytest.fixture
def sdpa_queries(monkeypatch) -> list[int]:
    """The chunked paths, not the CPU attention kernel (which holds a block of rows at a time anyway and
    ignores ``query_chunk``): the queries of each SDPA call, recorded."""
    monkeypatch.setattr(ops, "FUSED_ATTENTION", ())
    monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", None)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def counted(q, k, v, *args, **kwargs):
        seen.append(q.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", counted)
    return seen


@pytest.mark.parametrize("path", ["sdpa", "gemm"])
def test_chunked_attention_equals_sdpa_for_uneven_chunks(sdpa_queries, monkeypatch, path):
    if path == "gemm":  # the two-GEMM path of large maps (AVX-512), chunked the same way
        monkeypatch.setattr(ops, "GEMM_ATTENTION_MIN_KEYS", 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (50, 9, 9))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for chunk in (1, 7, 49, 50, 1000):
        sdpa_queries.clear()
        torch.testing.assert_close(attention(q, k, v, chunk), ref, rtol=0, atol=1e-6)
        if path == "sdpa":  # 50 queries in ceil(50 / chunk) calls
            assert sdpa_queries == [chunk] * (50 // chunk) + ([50 % chunk] if 50 % chunk else []), chunk


def test_attention_chunk_reaches_every_attention_module_and_keeps_the_image(pipe, sdpa_queries):
    def image_attention() -> list[int]:  # (the text encoder's calls, 77 tokens, have no low-memory mode)
        return [n for n in sdpa_queries if n != 77]

    ref = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
    assert max(image_attention()) > 5  # so that chunks of 5 change how attention runs
    sdpa_queries.clear()
    pipe.attention_chunk = 5
    try:
        chunked = [m for m in (*pipe.unet.modules(), *pipe.vae.modules()) if hasattr(m, "query_chunk")]
        assert chunked and all(m.query_chunk == 5 for m in chunked)
        out = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
    finally:
        pipe.attention_chunk = None
    assert image_attention() and max(image_attention()) <= 5
    assert abs(out - ref).max() < 1e-5


def test_tiled_decode_reassembles_a_local_decoder_exactly(pipe, monkeypatch):
    # With a decoder that acts on each latent pixel alone, tiles agree where they overlap, so the
    # weighted blend must give back exactly the one-piece decode: this checks placement and weights.
    f = pipe.vae_factor

    def local_decode(z):
        return torch.tanh(z[:, :3]).repeat_interleave(f, -1).repeat_interleave(f, -2)

    monkeypatch.setattr(pipe.vae, "decode", local_decode)
    z = torch.randn(2, 4, 37, 29, generator=torch.Generator().manual_seed(1))
    whole = pipe.decode_latents(z, tile=0)
    for tile in (8, 12, 16):  # 37 > 2 * tile: tiled
        tiled = pipe.decode_latents(z, tile=tile)
        assert tiled.shape == whole.shape == (2, 3, 37 * f, 29 * f)
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def test_latents_up_to_twice_the_tile_decode_in_one_piece(pipe):
    # Latents up to twice the tile side decode in one piece: bit-identical to no tiling.
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pipe.decode_latents(z, tile=12), pipe.decode_latents(z, tile=0))



def test_tiles_normalised_with_whole_image_statistics_stay_closer_to_the_one_piece_decode():
    # On the bundled (trained) model: a 160 px image, 40x40 latents, 16-latent tiles. Tiles that
    # normalise with their own GroupNorm statistics drift (a background-only tile has tiny
    # variances); the shared statistics of sdlite.ops.GroupNorm keep them closer to the whole decode.
    import sdlite
    from sdlite.training import shapes

    bundled = sdlite.load()
    image = torch.from_numpy(shapes.render("red", "circle", "left", size_px=160, rng=0)).permute(2, 0, 1)[None] / 255
    z = bundled.encode_image(image.float())
    whole = bundled.decode_latents(z, tile=0)
    shared = bundled.decode_latents(z, tile=16)
    with torch.no_grad():
        own = ((bundled._blend_tiles(z / bundled.scale_factor, 16, 4, 12) + 1) / 2).clamp(0, 1)
    err_shared, err_own = (shared - whole).abs().mean(), (own - whole).abs().mean()
    assert err_shared < 0.8 * err_own, (err_shared, err_own)


def test_low_memory_settings_and_their_validation(pipe):
    native = TINY_SD1.image_size // pipe.vae_factor
    pipe.set_low_memory()
    assert pipe.attention_chunk == 1024 and pipe.vae_tile == max(8, native // 2)
    pipe.set_low_memory(False)
    assert pipe.attention_chunk is None and pipe.vae_tile == native
    with pytest.raises(ArgumentError):
        pipe.vae_tile = 3
    with pytest.raises(ArgumentError):
        pipe.attention_chunk = 0


def test_low_memory_drops_the_cached_upsample_kernels_and_keeps_the_image(pipe, monkeypatch):
    # Every upsample by its four phases: where the upsampled map's conv would run by Winograd's
    # F(4x4, 3x3) (AVX2 CPUs, large maps), upsample_conv takes that instead and caches nothing.
    monkeypatch.setattr(ops, "WINOGRAD_CONV", ())
    in_unet, in_vae = ([m for m in net.modules() if hasattr(m, "cache_kernels")] for net in (pipe.unet, pipe.vae))
    assert in_unet and in_vae
    upsamplers = in_unet + in_vae
    ref = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
    assert all(hasattr(m.conv, "_phase_cache") for m in upsamplers)  # cached by default
    pipe.set_low_memory()
    try:
        out = pipe.txt2img("a cat", seed=3, steps=2, output_type="np")
        assert not any(hasattr(m.conv, "_phase_cache") for m in upsamplers)  # dropped, not rebuilt
    finally:
        pipe.set_low_memory(False)
    assert all(m.cache_kernels for m in upsamplers)
    # The same kernels, computed each call; the tiled decode does not apply at this size.
    assert abs(out - ref).max() < 1e-5
