"""Tests for the shapes data set (sdlite.training.shapes), the image analysis that reads it back
(sdlite.training.analysis) and the prompt-adherence evaluation built on both (scripts/evaluate.py)."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlite.errors import ArgumentError
from sdlite.training import analysis, shapes
from sdlite.training.shapes import COLOURS, HELD_OUT, POSITIONS, SHAPES, Attrs

ROOT = Path(__file__).resolve().parents[1]
CANONICAL = {prompt: attrs for prompt, attrs in shapes.eval_prompts("all")}


def render_prompt(prompt: str, seed: int, size_px: int = 64) -> Image.Image:
    """A perfect text-to-image model for canonical prompts."""
    return Image.fromarray(shapes.render(*CANONICAL[prompt], size_px=size_px, rng=seed))


# --- the generator -------------------------------------------------------------------------


def test_sample_batch_is_identical_for_the_same_seed_and_differs_for_another():
    a = shapes.sample_batch(64, seed=7)
    b = shapes.sample_batch(64, seed=7)
    c = shapes.sample_batch(64, seed=8)
    assert a[0].shape == (64, 64, 64, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_render_is_identical_for_the_same_seed_and_jitters_across_seeds():
    assert np.array_equal(shapes.render("red", "circle", "left", rng=3), shapes.render("red", "circle", "left", rng=3))
    assert not np.array_equal(shapes.render("red", "circle", "left", rng=3), shapes.render("red", "circle", "left", rng=4))
    assert shapes.render("blue", "triangle", "top", size_px=40, rng=0).shape == (40, 40, 3)


def test_held_out_set_is_the_12_documented_triples():
    rule = {Attrs(COLOURS[k // 2], SHAPES[k % 3], POSITIONS[k % 5]) for k in range(12)}
    assert HELD_OUT == rule and len(HELD_OUT) == 12
    assert set(shapes.all_combinations("heldout")) == HELD_OUT
    assert len(shapes.all_combinations("train")) == 78 and len(shapes.all_combinations("all")) == 90


def test_train_split_never_yields_a_held_out_triple_and_heldout_split_only_those():
    _, captions, attrs = shapes.sample_batch(5000, seed=0, size_px=8, split="train")
    assert not set(attrs) & HELD_OUT
    assert set(attrs) == set(shapes.all_combinations("train"))  # 5000 draws hit all 78
    assert not any(shapes.caption(*a) in captions for a in HELD_OUT)
    _, _, attrs = shapes.sample_batch(500, seed=0, size_px=8, split="heldout")
    assert set(attrs) == HELD_OUT


def test_every_value_and_every_attribute_pair_of_a_held_out_triple_appears_in_training():
    train = shapes.all_combinations("train")
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {t[i] for t in train} == set(values)
    for held in HELD_OUT:
        for i, j in itertools.combinations(range(3), 2):
            assert any(t[i] == held[i] and t[j] == held[j] for t in train), (held, i, j)


def test_captions_are_canonical_for_style_0_and_paraphrases_name_all_three_attributes():
    assert shapes.caption("red", "circle", "left") == "a red circle on the left"
    assert shapes.caption("blue", "square", "top") == "a blue square at the top"
    assert shapes.caption("green", "triangle", "center") == "a green triangle in the center"
    assert shapes.caption("yellow", "circle", "right") == "a yellow circle on the right"
    assert shapes.caption("purple", "square", "bottom") == "a purple square at the bottom"
    assert shapes.caption("orange", "circle", "left") == "an orange circle on the left"
    styles = [shapes.caption("red", "circle", "left", style=s) for s in range(shapes.N_STYLES)]
    assert len(set(styles)) == shapes.N_STYLES
    assert all("red circle" in c and ("left" in c) for c in styles)
    with pytest.raises(ArgumentError):
        shapes.caption("pink", "circle", "left")


def test_paraphrases_appear_only_at_their_probability():
    _, captions, attrs = shapes.sample_batch(2000, seed=1, size_px=8, paraphrase_prob=0.2)
    paraphrased = np.mean([c != shapes.caption(*a) for c, a in zip(captions, attrs)])
    assert 0.15 < paraphrased < 0.25
    _, captions, attrs = shapes.sample_batch(200, seed=1, size_px=8, paraphrase_prob=0.0)
    assert captions == [shapes.caption(*a) for a in attrs]


def test_eval_prompts_are_canonical_and_6_limited_prompts_show_every_value():
    prompts = shapes.eval_prompts("heldout")
    assert prompts[0] == ("a red circle on the left", Attrs("red", "circle", "left"))
    assert all(p == shapes.caption(*a) for p, a in shapes.eval_prompts("all"))
    for split in ("train", "all"):
        few = [a for _, a in shapes.eval_prompts(split, limit=6)]
        assert len(set(few)) == 6 and set(few) <= set(shapes.all_combinations(split))
        for i, values in enumerate((COLOURS, SHAPES, POSITIONS)):
            assert {a[i] for a in few} == set(values)
    assert len(shapes.eval_prompts("train", limit=1000)) == 78
    with pytest.raises(ArgumentError):
        shapes.eval_prompts("test")


# --- the analysis ----------------------------------------------------------------------------


def score(images_and_attrs) -> dict[str, float]:
    found = [(analysis.analyse(im), a) for im, a in images_and_attrs]
    out = {k: np.mean([f[k] == getattr(a, k) for f, a in found]) for k in analysis.ATTRIBUTES}
    out["all"] = np.mean([all(f[k] == getattr(a, k) for k in analysis.ATTRIBUTES) for f, a in found])
    return out


def test_analysis_recovers_colour_shape_position_of_all_90_combinations_at_least_99_percent():
    # 450 images (5 seeds per combination), 64x64: measured 100% for every attribute.
    cases = [(shapes.render(*a, rng=1000 * i + s), a) for i, a in enumerate(shapes.all_combinations()) for s in range(5)]
    acc = score(cases)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_analysis_at_least_99_percent_on_noisy_blurred_upscaled_images():
    # Like a generated image: Gaussian pixel noise (sigma 20 levels), blur (radius 1 px at 64),
    # upscaled to 256. Measured 100% on 900 such images.
    rng = np.random.default_rng(0)
    cases = []
    for a in shapes.all_combinations():
        for _ in range(2):
            im = shapes.render(*a, rng=rng).astype(np.float32) + rng.normal(0, 20, (64, 64, 3))
            pil = Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
            cases.append((pil.resize((256, 256), Image.Resampling.BICUBIC), a))
    acc = score(cases)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_analysis_finds_nothing_in_a_blank_image_and_no_colour_for_a_grey_object():
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert analysis.analyse(blank) == {"colour": None, "shape": None, "position": None}
    grey_square = blank.copy()
    grey_square[8:28, 22:42] = 230
    assert analysis.analyse(grey_square) == {"colour": None, "shape": "square", "position": "top"}


def test_analysis_ignores_a_speck_next_to_the_object():
    im = shapes.render("green", "circle", "right", rng=0)
    im[60:62, 2:4] = (215, 35, 35)  # a red 2x2 speck in the bottom-left corner
    assert analysis.analyse(im) == {"colour": "green", "shape": "circle", "position": "right"}


# --- the evaluation ---------------------------------------------------------------------------


def test_evaluate_scores_100_percent_for_a_generator_that_draws_the_prompt():
    result = analysis.evaluate(render_prompt, shapes.eval_prompts("all"), seeds=[0, 1])
    assert result["n_images"] == 180 and result["n_prompts"] == 90
    assert result["accuracy"] == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    assert result["seconds_per_image"] >= 0 and all(r["correct"] for r in result["records"])
    json.dumps(result)  # JSON-serialisable as is


def test_evaluate_scores_a_generator_that_always_draws_a_red_circle_on_the_left_at_chance():
    def always_red_circle_left(prompt: str, seed: int) -> Image.Image:
        return Image.fromarray(shapes.render("red", "circle", "left", rng=seed))

    result = analysis.evaluate(always_red_circle_left, shapes.eval_prompts("all"), seeds=[0])
    # Over all 90 combinations: 1/6 are red, 1/3 circles, 1/5 on the left, 1/90 all three.
    assert result["accuracy"] == pytest.approx({"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 5, "all": 1 / 90})
    # The held-out split contains "a red circle on the left" itself; counts follow HELD_OUT.
    held = analysis.evaluate(always_red_circle_left, shapes.eval_prompts("heldout"), seeds=[0, 1],
                             keep_images=True)
    assert held["accuracy"] == pytest.approx({"colour": 2 / 12, "shape": 4 / 12, "position": 3 / 12, "all": 1 / 12})
    assert len(held["images"]) == 24


def test_evaluate_accepts_attributes_as_dicts_and_tuples():
    a = analysis.evaluate(render_prompt, [("a red circle on the left", {"colour": "red", "shape": "circle",
                                                                        "position": "left"})], [0])
    b = analysis.evaluate(render_prompt, [("a red circle on the left", ("red", "circle", "left"))], [0])
    assert a["accuracy"]["all"] == b["accuracy"]["all"] == 1.0


def test_evaluate_script_runs_end_to_end_on_a_fake_pipeline(tmp_path, monkeypatch, capsys):
    import sdlite

    calls = []

    class FakePipeline:
        def txt2img(self, prompt: str, seed: int, **options) -> list[Image.Image]:
            calls.append(options)
            return [render_prompt(prompt, seed)]

    loaded = []
    monkeypatch.setattr(sdlite, "load", lambda ckpt=None: loaded.append(ckpt) or FakePipeline(), raising=False)
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    out, grid = tmp_path / "r.json", tmp_path / "g.png"
    argv = ["--prompts", "3", "--seeds", "2", "--steps", "5", "--out", str(out), "--grid", str(grid)]
    assert script.main(argv) == 0
    assert loaded == [None] and calls[0] == {"steps": 5} and len(calls) == 2 * 3 * 2
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"train", "heldout"}
    assert all(r["accuracy"]["all"] == 1.0 and r["n_images"] == 6 for r in results.values())
    assert "| heldout | 6 | 100.0% |" in capsys.readouterr().out
    assert Image.open(grid).size == (script.LABEL_WIDTH + 2 * script.THUMB, 6 * script.THUMB)
