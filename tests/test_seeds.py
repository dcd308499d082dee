"""A1111's seed tools (sdlite.seeds): variation seeds (a slerp of two seeds' noise), "Resize seed
from" (the seed's noise drawn at another size and centred) and the "Eta noise seed delta" (ENSD), in
the noise, the pipeline, the infotext and the command line. (The web API's fields are tested in test_webui_api.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sdlite
from sdlite import cli
from sdlite.errors import ArgumentError
from sdlite.infotext import parse_infotext
from sdlite.seeds import paste_centred, random_streams, slerp

from test_pipeline import make_pipe


def noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


# -- the noise -----------------------------------------------------------------------------------

def slerp_reference(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The formula in float64, one great circle per (channel, column) along the height, as A1111 measures
    the angle (its tensor is [C, H, W] and it normalises dim 1)."""
    out = np.empty_like(low)
    for c in range(low.shape[0]):
        for x in range(low.shape[2]):
            u, v = low[c, :, x], high[c, :, x]
            omega = math.acos(float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))))
            out[c, :, x] = (math.sin((1 - t) * omega) * u + math.sin(t * omega) * v) / math.sin(omega)
    return out


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.9, 1.4])
def test_slerp_is_the_great_circle_formula_per_column_along_the_height_as_a1111_measures_it(t):
    low, high = noise(1, (4, 12, 10)), noise(2, (4, 12, 10))
    expected = slerp_reference(t, low.double().numpy(), high.double().numpy())
    np.testing.assert_allclose(slerp(t, low, high).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_slerp_ends_on_each_noise_and_its_midpoint_keeps_unit_variance_where_a_straight_line_does_not():
    low, high = noise(3, (4, 64, 64)), noise(4, (4, 64, 64))
    torch.testing.assert_close(slerp(0.0, low, high), low, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(1.0, low, high), high, rtol=0, atol=1e-6)
    assert abs(slerp(0.5, low, high).std().item() - 1.0) < 0.02
    assert abs(((low + high) / 2).std().item() - math.sqrt(0.5)) < 0.02  # what slerp avoids


def test_slerp_of_a_noise_with_itself_is_that_noise_not_a_division_by_zero():
    x = noise(5, (4, 8, 8))
    torch.testing.assert_close(slerp(0.3, x, x.clone()), x)


def test_paste_centred_cuts_out_the_centre_of_a_larger_noise_and_pads_a_smaller_one_with_the_new_noise():
    big, small = noise(1, (2, 8, 10)), noise(2, (2, 4, 6))
    out = paste_centred(small, big)
    assert torch.equal(out[:, 2:6, 2:8], small)
    mask = torch.ones(8, 10, dtype=torch.bool)
    mask[2:6, 2:8] = False
    assert torch.equal(out[:, mask], big[:, mask])
    larger = noise(3, (2, 12, 14))
    assert torch.equal(paste_centred(larger, big), larger[:, 2:10, 2:12])


def test_paste_centred_of_an_odd_cut_keeps_a1111s_extra_lost_row():
    """11 rows into 8: offset (8 - 11) // 2 = -2, so rows 2..8 of the larger noise fill rows 0..6 and
    row 7 keeps the new noise (A1111 cuts 4 rows where 3 would do)."""
    big, larger = noise(1, (1, 8, 8)), noise(2, (1, 11, 8))
    out = paste_centred(larger, big)
    assert torch.equal(out[:, :7], larger[:, 2:9])
    assert torch.equal(out[:, 7], big[:, 7])


def test_variation_noise_is_the_slerp_of_the_seed_and_variation_seed_noises_and_0_changes_nothing():
    shape = (4, 8, 8)
    plain, _ = random_streams([5, 6], shape)
    off, _ = random_streams([5, 6], shape, variation_seeds=[9, 10], variation_strength=0.0)
    assert torch.equal(plain, off)
    varied, _ = random_streams([5, 5], shape, variation_seeds=[9, 10], variation_strength=0.25)
    torch.testing.assert_close(varied[1], slerp(0.25, noise(5, shape), noise(10, shape)), rtol=0, atol=0)


def test_seed_resize_from_a_larger_size_is_the_centre_of_the_noise_at_that_size():
    resized, _ = random_streams([7], (4, 8, 8), seed_shape=(4, 12, 16))
    assert torch.equal(resized[0], noise(7, (4, 12, 16))[:, 2:10, 4:12])
    from_smaller, _ = random_streams([7], (4, 8, 8), seed_shape=(4, 4, 4))
    assert torch.equal(from_smaller[0, :, 2:6, 2:6], noise(7, (4, 4, 4)))
    assert torch.equal(from_smaller[0, :, 0], noise(7, (4, 8, 8))[:, 0])  # outside: the seed's own noise


@pytest.mark.parametrize("kwargs", [dict(variation_seeds=[9], variation_strength=0.5), dict(seed_shape=(4, 6, 6))])
def test_the_seed_tools_leave_the_samplers_later_draws_as_they_were(kwargs):
    """The ancestral and SDE samplers draw their noise from the seed's stream after the starting noise."""
    _, plain = random_streams([5], (4, 8, 8))
    _, tooled = random_streams([5], (4, 8, 8), **kwargs)
    assert torch.equal(torch.randn(4, 8, 8, generator=plain[0]), torch.randn(4, 8, 8, generator=tooled[0]))


def test_random_streams_wants_a_variation_seed_per_image():
    with pytest.raises(ArgumentError, match="one variation seed per image"):
        random_streams([1, 2], (4, 8, 8), variation_seeds=[3], variation_strength=0.5)


# -- the pipeline and its infotext -----------------------------------------------------------------

def test_a_variation_batch_keeps_the_seed_counts_the_variation_seed_and_equals_single_runs(pipe):
    kw = dict(steps=3, sampler="euler_a", variation_strength=0.3)
    batch = pipe.txt2img("a cat", seed=10, variation_seed=20, batch_size=2, **kw)
    assert batch.seeds == [10, 10] and batch.variation_seeds == [20, 21]
    single = pipe.txt2img("a cat", seed=10, variation_seed=21, output_type="latent", **kw)
    latents = pipe.txt2img("a cat", seed=10, variation_seed=20, batch_size=2, output_type="latent", **kw)
    torch.testing.assert_close(latents[1:], single, rtol=1e-5, atol=1e-5)
    plain = pipe.txt2img("a cat", seed=10, steps=3, sampler="euler_a", output_type="latent")
    assert not torch.allclose(latents[:1], plain)  # the variation moved it
    p = parse_infotext(batch.infotexts[1])
    assert (p["Seed"], p["Variation seed"], p["Variation seed strength"]) == ("10", "21", "0.3")


def test_seed_tools_are_written_where_a1111_puts_them_and_only_when_used(pipe):
    text = pipe.txt2img("a cat", seed=1, steps=1, variation_seed=2, variation_strength=0.1,
                        seed_resize_from=(48, 64)).infotexts[0]
    keys = [item.split(":")[0] for item in text.splitlines()[-1].split(", ")]
    assert keys.index("Model") < keys.index("Variation seed") < keys.index("Variation seed strength") \
        < keys.index("Seed resize from") < keys.index("RNG")
    p = parse_infotext(text)
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == ("48", "64")  # A1111's WxH pair
    plain = pipe.txt2img("a cat", seed=1, steps=1, variation_seed=2).infotexts[0]  # strength 0: off
    assert "Variation" not in plain and "Seed resize" not in plain


def test_a_random_variation_seed_is_drawn_and_reported(pipe):
    images = pipe.txt2img("a cat", seed=1, steps=1, variation_strength=0.5, batch_size=2)
    v = images.variation_seeds
    assert 0 <= v[0] < 2**32 and v == [v[0], v[0] + 1]
    assert f"Variation seed: {v[1]}" in images.infotexts[1]


def test_seed_resize_from_the_same_size_changes_nothing_but_the_infotext(pipe):
    plain = pipe.txt2img("a cat", seed=4, steps=2, output_type="latent")
    same = pipe.txt2img("a cat", seed=4, steps=2, seed_resize_from=(32, 32), output_type="latent")
    assert torch.equal(plain, same)


def test_img2img_takes_the_seed_tools_too(pipe):
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    a = pipe.img2img(image, "a cat", seed=3, steps=2, variation_seed=8, variation_strength=0.5)
    b = pipe.img2img(image, "a cat", seed=3, steps=2)
    assert "Variation seed: 8" in a.infotexts[0] and np.asarray(a[0]).tobytes() != np.asarray(b[0]).tobytes()


@pytest.mark.parametrize("kwargs, match", [
    (dict(variation_strength=float("nan")), "variation_strength must be a finite number"),
    (dict(variation_strength=0.5, variation_seed=2**64), "variation_seed must be"),
    (dict(variation_strength=0.5, variation_seed=2**64 - 1, batch_size=2), "variation_seed ≤"),
    (dict(seed_resize_from=(0, 32)), "seed_resize_from"),
])
def test_bad_seed_tool_values_are_argument_errors(pipe, kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        pipe.txt2img("a cat", seed=1, steps=1, **kwargs)


# -- Eta noise seed delta (ENSD) ---------------------------------------------------------------------

def test_ensd_reseeds_only_the_samplers_noise_not_the_starting_noise():
    plain, _ = random_streams([5, 6], (4, 8, 8))
    same, generators = random_streams([5, 6], (4, 8, 8), noise_seed_delta=31337)
    assert torch.equal(plain, same)
    assert torch.equal(torch.randn(4, 8, 8, generator=generators[1]), noise(6 + 31337, (4, 8, 8)))


def test_an_ancestral_sampler_with_ensd_draws_its_noise_from_seed_plus_ensd_and_records_it(pipe):
    kw = dict(steps=3, sampler="euler_a", batch_size=2)
    images = pipe.txt2img("a cat", seed=5, eta_noise_seed_delta=31337, **kw)
    latent = pipe.txt2img("a cat", seed=5, eta_noise_seed_delta=31337, output_type="latent", **kw)
    # The same run through the sampling loop, with the streams A1111 reseeds: seed + ENSD per image.
    start, _ = random_streams([5, 6], (4, 16, 16))
    cond, uncond = pipe.encode_prompts([["a cat"] * 2, [""] * 2])
    expected = pipe.sample(start, cond, uncond, steps=3, guidance_scale=7.5, sampler="euler_a", schedule=None,
                           eta=None, generators=[torch.Generator().manual_seed(s + 31337) for s in (5, 6)])
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latent, pipe.txt2img("a cat", seed=5, output_type="latent", **kw))
    keys = [item.split(":")[0] for item in images.infotexts[1].splitlines()[-1].split(", ")]
    assert "ENSD" in keys and keys.index("Model") < keys.index("ENSD") < keys.index("RNG")
    assert parse_infotext(images.infotexts[1])["ENSD"] == "31337"


@pytest.mark.parametrize("kwargs", [dict(sampler="euler"), dict(sampler="dpmpp_2m_sde"), dict(sampler="ddim", eta=0.5),
                                    dict(sampler="euler_a", eta=0.0)])
def test_ensd_changes_nothing_and_is_not_recorded_where_a1111_does_not_record_it(pipe, kwargs):
    plain = pipe.txt2img("a cat", seed=5, steps=2, **kwargs)
    with_ensd = pipe.txt2img("a cat", seed=5, steps=2, eta_noise_seed_delta=31337, **kwargs)
    assert np.asarray(plain[0]).tobytes() == np.asarray(with_ensd[0]).tobytes()
    assert plain.infotexts == with_ensd.infotexts and "ENSD" not in with_ensd.infotexts[0]


def test_an_ensd_that_takes_a_seed_past_what_torch_takes_is_an_argument_error(pipe):
    with pytest.raises(ArgumentError, match="seed \\+ eta_noise_seed_delta"):
        pipe.txt2img("a cat", seed=2**64 - 5, steps=1, eta_noise_seed_delta=31337)
    with pytest.raises(ArgumentError, match="eta_noise_seed_delta must be a whole number"):
        pipe.txt2img("a cat", seed=1, steps=1, eta_noise_seed_delta=0.5)


# -- the command line ------------------------------------------------------------------------------

def test_cli_variation_seed_counts_on_across_batches_while_the_seed_stays(tmp_path, monkeypatch, pipe):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sdlite, "load", lambda *a, **k: pipe)
    argv = ["--prompt", "a cat", "--seed", "5", "--steps", "1", "--n_samples", "2", "--n_iter", "2", "--quiet",
            "--variation-seed", "30", "--variation-strength", "0.2", "--seed-resize-from", "48x40", "--ensd", "31337"]
    assert cli.run(argv, img2img=False) == 0
    from sdlite.infotext import read_infotext

    pngs = sorted((tmp_path / "outputs" / "txt2img-samples").iterdir())
    params = [parse_infotext(read_infotext(p)) for p in pngs]
    assert [p["Seed"] for p in params] == ["5"] * 4
    assert [p["Variation seed"] for p in params] == ["30", "31", "32", "33"]
    assert {(p["Seed resize from-1"], p["Seed resize from-2"]) for p in params} == {("48", "40")}
    assert {p["ENSD"] for p in params} == {"31337"}  # (the default sampler, Euler a, uses it)


@pytest.mark.parametrize("argv, match", [
    (["--seed-resize-from", "512"], "WIDTHxHEIGHT"),
    (["--seed-resize-from", "4x512"], "at least 8"),
    (["--variation-strength", "nan"], "finite"),
    (["--variation-strength", "0.5", "--variation-seed", str(2**64)], "--variation-seed must be"),
])
def test_cli_rejects_bad_seed_tool_values_before_loading(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)

    def never_load(*a, **k):
        raise AssertionError("loaded the model before rejecting the input")

    monkeypatch.setattr(sdlite, "load", never_load)
    assert cli.run(["--prompt", "a cat", *argv], img2img=False) == 2
    assert match in capsys.readouterr().err
