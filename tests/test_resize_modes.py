"""A1111's img2img resize modes (sdlite.resize and Pipeline.img2img's ``resize_mode``).

The references are written here with numpy slicing on synthetic images. Sizes are chosen so that the
scaled image needs no resampling (a 64×32 image cropped to 32×32 keeps its height: PIL returns it
unchanged), which makes "which source pixels land where" exact; where the image is really scaled, the
reference is PIL's Lanczos resize to the size A1111's integer arithmetic gives, written out as a number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite
from sdlite.resize import RESIZE_MODES, parse_resize_mode, resize_image

from test_pipeline import make_pipe


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def lanczos(image: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS)).astype(np.int64)


def edge_band_row(edge: np.ndarray, next_in: np.ndarray) -> np.ndarray:
    """A band row as A1111 makes it: PIL's bicubic (a = -0.5) resize of a zero-thickness box on the edge
    samples the rows 0.5 and 1.5 px away, weights 0.5625 and -0.0625, normalised: 1.125 and -0.125."""
    return np.clip(np.floor(1.125 * edge - 0.125 * next_in + 0.5), 0, 255).astype(np.int64)


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# -- the mode names -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, spellings", [
    (0, [0, "0", "just_resize", "Just resize", "JUST RESIZE"]),
    (1, [1, "1", "crop", "Crop and resize", " crop "]),
    (2, [2, "2", "fill", "Resize and fill"]),
    (3, [3, "3", "latent", "Just resize (latent upscale)"]),
])
def test_each_mode_is_selected_by_its_a1111_number_sdlite_name_or_a1111_label(mode, spellings):
    assert [parse_resize_mode(s) for s in spellings] == [mode] * len(spellings)
    assert RESIZE_MODES[mode][1] in ("Just resize", "Crop and resize", "Resize and fill",
                                     "Just resize (latent upscale)")


@pytest.mark.parametrize("value", [4, -1, "5", "cropped", "", None, 1.0, True])
def test_any_other_resize_mode_is_an_argument_error_listing_the_valid_values(value):
    with pytest.raises(sdlite.ArgumentError, match=r'resize_mode must be one of: 0 = "just_resize" = "Just resize";'
                                                   r'.*3 = "latent" = "Just resize \(latent upscale\)"; got'):
        parse_resize_mode(value)


def test_resize_image_refuses_the_latent_mode_which_resizes_the_latent_not_the_image():
    with pytest.raises(sdlite.ArgumentError, match="Pipeline.img2img"):
        resize_image(random_image(16, 16), 32, 32, "latent")


# -- mode 0: just resize --------------------------------------------------------------------------

def test_just_resize_stretches_with_lanczos_to_the_target_size():
    image = random_image(41, 20)
    assert np.array_equal(px(resize_image(image, 32, 48, 0)), lanczos(image, 32, 48))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_an_image_that_has_the_target_size_comes_back_with_the_same_pixels(mode):
    image = random_image(40, 24)
    out = resize_image(image, 40, 24, mode)
    assert out.size == (40, 24) and np.array_equal(px(out), px(image))


# -- mode 1: crop and resize ----------------------------------------------------------------------

def test_crop_keeps_the_centre_columns_of_a_wide_image_that_already_has_the_target_height():
    image = random_image(64, 32)
    assert np.array_equal(px(resize_image(image, 32, 32, "crop")), px(image)[:, 16:48])


def test_crop_of_an_odd_excess_drops_the_extra_column_on_the_right_and_the_extra_row_at_the_bottom():
    # A1111 pastes at width // 2 - w // 2 = 16 - 32 = -16: columns 16..47 of 65 are kept (16 cut on
    # the left, 17 on the right); (width - w) // 2 would give -17.
    wide, tall = random_image(65, 32, seed=1), random_image(32, 65, seed=2)
    assert np.array_equal(px(resize_image(wide, 32, 32, "crop")), px(wide)[:, 16:48])
    assert np.array_equal(px(resize_image(tall, 32, 32, "crop")), px(tall)[16:48, :])


def test_crop_scales_the_image_to_cover_the_target_with_a1111s_floor_division_then_cuts_the_centre():
    # 41x20 into 32x32: the height fits, the width is 41 * 32 // 20 = 65 (65.6 floored); keep 16..47.
    wide = random_image(41, 20, seed=3)
    assert np.array_equal(px(resize_image(wide, 32, 32, 1)), lanczos(wide, 65, 32)[:, 16:48])
    # 20x41 into 48x32: the width fits, the height is 41 * 48 // 20 = 98; keep rows 49 - 16 = 33..64.
    tall = random_image(20, 41, seed=4)
    assert np.array_equal(px(resize_image(tall, 48, 32, 1)), lanczos(tall, 48, 98)[33:65, :])


def test_crop_of_an_image_with_the_target_aspect_ratio_is_a_plain_stretch():
    image = random_image(20, 30, seed=5)
    assert np.array_equal(px(resize_image(image, 32, 48, "crop")), lanczos(image, 32, 48))


# -- mode 2: resize and fill ----------------------------------------------------------------------

def test_fill_centres_a_wide_image_and_fills_the_bands_with_its_stretched_top_and_bottom_rows():
    image = random_image(32, 16, seed=6)
    src = px(image)
    out = px(resize_image(image, 32, 32, "fill"))
    assert np.array_equal(out[8:24], src)  # pasted at y = 32 // 2 - 16 // 2 = 8, not rescaled
    assert np.array_equal(out[:8], np.broadcast_to(edge_band_row(src[0], src[1]), (8, 32, 3)))
    assert np.array_equal(out[24:], np.broadcast_to(edge_band_row(src[-1], src[-2]), (8, 32, 3)))


def test_fill_centres_a_tall_image_and_fills_the_bands_with_its_stretched_outer_columns():
    image = random_image(16, 32, seed=7)
    src = px(image)
    out = px(resize_image(image, 32, 32, "fill"))
    assert np.array_equal(out[:, 8:24], src)
    assert np.array_equal(out[:, :8], np.broadcast_to(edge_band_row(src[:, 0], src[:, 1])[:, None], (32, 8, 3)))
    assert np.array_equal(out[:, 24:], np.broadcast_to(edge_band_row(src[:, -1], src[:, -2])[:, None], (32, 8, 3)))


def test_a_fill_band_of_an_image_whose_two_edge_rows_are_equal_is_that_row_repeated():
    image = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (16, 1, 3)))  # columns
    out = px(resize_image(image, 32, 32, "fill"))
    assert np.array_equal(out[:8], np.broadcast_to(px(image)[0], (8, 32, 3)))


def test_fill_of_an_odd_gap_makes_the_top_band_one_row_thicker_than_the_bottom_band():
    # A 15-row image in 32 rows: pasted at y = 16 - 7 = 9, so 9 band rows above and 8 below.
    image = random_image(32, 15, seed=8)
    src = px(image)
    out = px(resize_image(image, 32, 32, "fill"))
    assert np.array_equal(out[9:24], src)
    assert np.array_equal(out[:9], np.broadcast_to(edge_band_row(src[0], src[1]), (9, 32, 3)))
    assert np.array_equal(out[24:], np.broadcast_to(edge_band_row(src[-1], src[-2]), (8, 32, 3)))


def test_fill_scales_the_image_to_fit_inside_the_target_with_a1111s_floor_division():
    # 41x20 into 32x32: the width fits, the height is 20 * 32 // 41 = 15 (15.6 floored), pasted at y = 9.
    image = random_image(41, 20, seed=9)
    scaled = lanczos(image, 32, 15)
    out = px(resize_image(image, 32, 32, 2))
    assert np.array_equal(out[9:24], scaled)
    assert np.array_equal(out[:9], np.broadcast_to(edge_band_row(scaled[0], scaled[1]), (9, 32, 3)))
    assert np.array_equal(out[24:], np.broadcast_to(edge_band_row(scaled[-1], scaled[-2]), (8, 32, 3)))


def test_fill_of_an_image_with_the_target_aspect_ratio_is_a_plain_stretch_without_bands():
    image = random_image(20, 30, seed=10)
    assert np.array_equal(px(resize_image(image, 32, 48, "fill")), lanczos(image, 32, 48))


# -- the pipeline ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def encoder_inputs(pipe, monkeypatch) -> list[torch.Tensor]:
    """Records the pixels each ``encode_image`` call gets (and still encodes them)."""
    seen, encode = [], pipe.encode_image
    monkeypatch.setattr(pipe, "encode_image", lambda images: (seen.append(images), encode(images))[1])
    return seen


def sampler_inits(pipe, monkeypatch) -> list[torch.Tensor]:
    """Records the init latent each sampling run starts from, and returns it as the result."""
    seen = []

    def sample(noise, cond, uncond, *, init=None, **kwargs):
        seen.append(init)
        return init

    monkeypatch.setattr(pipe, "sample", sample)
    return seen


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_img2img_encodes_the_init_image_as_resize_image_makes_it(pipe, monkeypatch, mode):
    image = random_image(41, 20, seed=11)
    seen = encoder_inputs(pipe, monkeypatch)
    pipe.img2img(image, "a cat", steps=1, width=32, height=32, resize_mode=mode, output_type="latent")
    expected = torch.from_numpy(px(resize_image(image, 32, 32, mode)).astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(seen[0][0], expected)


def bilinear(latent: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of ``[C, H, W]`` with half-pixel centres (align_corners=False) and no antialiasing:
    output pixel i reads source coordinate (i + 0.5) · in/out − 0.5, clamped at 0, from its two neighbours."""
    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = taps(latent.shape[1], out_h)
    x0, x1, wx = taps(latent.shape[2], out_w)
    rows = latent[:, y0] * (1 - wy)[:, None] + latent[:, y1] * wy[:, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def test_latent_mode_encodes_the_image_at_its_own_size_and_resizes_the_latent_bilinearly(pipe, monkeypatch):
    # 41x20 px: the encoder takes all of it (A1111 does not round the image); the VAE's right/bottom-padded
    # stride-2 convolutions give a floor(20/f) x floor(41/f) latent, resized to 32x32 px's latent: the
    # width shrinks (20 -> 16), the height grows (10 -> 16).
    image = random_image(41, 20, seed=12)
    pixels = encoder_inputs(pipe, monkeypatch)
    inits = sampler_inits(pipe, monkeypatch)
    pipe.img2img(image, "a cat", steps=1, width=32, height=32, resize_mode="latent", output_type="latent")
    assert pixels[0].shape == (1, 3, 20, 41)
    assert torch.equal(pixels[0][0], torch.from_numpy(px(image).astype(np.float32) / 255).permute(2, 0, 1))
    f = pipe.vae_factor
    own = pipe.encode_image(pixels[0])
    assert own.shape[-2:] == (20 // f, 41 // f)
    assert inits[0].shape == (1, pipe.latent_channels, 32 // f, 32 // f)
    expected = bilinear(own[0].numpy().astype(np.float64), 32 // f, 32 // f)
    np.testing.assert_allclose(inits[0][0].numpy(), expected, rtol=0, atol=1e-5)


def test_resizing_a_latent_to_its_own_size_changes_nothing(pipe):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe.resize_latent(latent, 16 * pipe.vae_factor, 16 * pipe.vae_factor), latent)


@pytest.mark.parametrize("mode", list(RESIZE_MODES))
def test_img2img_runs_in_every_resize_mode_and_the_infotext_does_not_record_it(pipe, mode):
    out = pipe.img2img(random_image(41, 20, seed=13), "a cat", strength=0.5, steps=2, seed=1, width=32,
                       height=32, resize_mode=mode)
    assert out[0].size == (32, 32)
    assert np.isfinite(px(out[0])).all()
    assert "resize" not in out.infotexts[0].lower()  # as A1111, whose infotext has no "Resize mode"


def test_the_resize_mode_changes_the_image_img2img_starts_from(pipe):
    image = random_image(41, 20, seed=14)
    latents = [pipe.img2img(image, "a cat", strength=0.3, steps=3, seed=1, width=32, height=32, resize_mode=m,
                            sampler="euler", output_type="latent") for m in RESIZE_MODES]
    for i in range(len(latents)):
        for j in range(i):
            assert (latents[i] - latents[j]).abs().max() > 1e-3, (i, j)
