"""The A1111 "parameters" infotext: layout, parsing, hashes, and PNG files other tools can read."""

import hashlib
import io

import pytest
from PIL import Image

from sdlite.infotext import (
    format_infotext,
    generation_params,
    make_pnginfo,
    model_hash,
    parse_infotext,
    quote,
    read_infotext,
    save_png,
    sha256_file,
    short_hash,
    unquote,
)

A1111_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed\n"
    "Negative prompt: ugly, fat, (((deformed))), [blurry], bad anatomy\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x512, "
    "Model hash: 45dee52b, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def example_params(**overrides):
    kw = dict(
        steps=20, sampler="Euler a", schedule="Karras", cfg_scale=7.0, seed=965400086, width=512, height=512,
        model_hash="45dee52b", model_name="v1-5-pruned-emaonly", version="v1.10.1",
    )
    kw.update(overrides)
    return generation_params(**kw)


# --------------------------------------------------------------------------------------------
# quote / unquote
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,quoted",
    [
        ("Euler a", "Euler a"),
        ("a, b", '"a, b"'),
        ("a: b", '"a: b"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("ünïcode, ☃", '"ünïcode, ☃"'),  # ensure_ascii=False
    ],
)
def test_quote_json_encodes_only_values_with_comma_colon_or_newline(value, quoted):
    assert quote(value) == quoted
    assert unquote(quoted) == value


def test_quote_returns_other_values_unchanged_and_unquote_leaves_plain_text():
    assert quote(7) == 7
    assert unquote("7") == "7"
    assert unquote("") == ""
    assert unquote('"not json') == '"not json'
    assert unquote('"bad \\q"') == '"bad \\q"'


# --------------------------------------------------------------------------------------------
# format_infotext / generation_params
# --------------------------------------------------------------------------------------------


def test_format_infotext_equals_a_hand_written_a1111_infotext():
    prompt, negative = A1111_EXAMPLE.split("\n")[:2]
    text = format_infotext(prompt, negative[len("Negative prompt: "):], example_params())
    assert text == A1111_EXAMPLE


def test_generation_params_uses_a1111_key_order():
    params = generation_params(
        steps=30, sampler="DPM++ 2M", schedule="Karras", cfg_scale=7.5, seed=1, width=768, height=512,
        model_hash="6ce0161689", model_name="v2-1_768", variation_seed=9, variation_strength=0.1,
        seed_resize_from=(512, 512), denoising_strength=0.75, clip_skip=2, ensd=31337,
        token_merging_ratio=0.5, eta=0.5, rng="CPU", extra={"Hires upscaler": "Latent"}, version="sdlite 0.1.0",
    )
    assert list(params) == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
        "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength", "Clip skip", "ENSD",
        "Token merging ratio", "RNG", "Eta", "Hires upscaler", "Version",
    ]
    assert format_infotext("p", "", params) == (
        "p\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v2-1_768, Variation seed: 9, Variation seed strength: 0.1, "
        "Seed resize from: 512x512, Denoising strength: 0.75, Clip skip: 2, ENSD: 31337, Token merging ratio: 0.5, "
        "RNG: CPU, Eta: 0.5, Hires upscaler: Latent, Version: sdlite 0.1.0"
    )


def test_a_ddim_eta_is_written_as_a1111s_ddim_samplers_write_it():
    params = generation_params(steps=20, sampler="DDIM", cfg_scale=7, seed=1, width=64, height=64, eta=0.4,
                               eta_key="Eta DDIM")
    assert "Eta DDIM: 0.4" in format_infotext("p", "", params) and "Eta" not in params


def test_format_infotext_drops_none_values_and_omits_empty_negative_line():
    params = example_params(schedule=None, model_hash=None, version=None)
    text = format_infotext("a cat", "", params)
    assert text == "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model: v1-5-pruned-emaonly"


def test_clip_skip_of_one_is_not_written():
    assert generation_params(steps=1, sampler="Euler", cfg_scale=1, seed=0, width=8, height=8, clip_skip=1)["Clip skip"] is None


def test_token_merging_ratio_of_zero_is_not_written():
    params = generation_params(steps=1, sampler="Euler", cfg_scale=1, seed=0, width=8, height=8, token_merging_ratio=0.0)
    assert params["Token merging ratio"] is None


def test_format_infotext_writes_a_value_equal_to_its_key_as_the_bare_key():
    assert format_infotext("p", "", {"Steps": 1, "Tiling": "Tiling", "Seed": 2}) == "p\nSteps: 1, Tiling, Seed: 2"


# --------------------------------------------------------------------------------------------
# parse_infotext
# --------------------------------------------------------------------------------------------


def test_parse_infotext_reads_the_a1111_example():
    res = parse_infotext(A1111_EXAMPLE)
    assert res == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, ((eyeshadow)), (coquettish), detailed",
        "Negative prompt": "ugly, fat, (((deformed))), [blurry], bad anatomy",
        "Steps": "20", "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": "7", "Seed": "965400086",
        "Size-1": "512", "Size-2": "512", "Model hash": "45dee52b", "Model": "v1-5-pruned-emaonly",
        "Version": "v1.10.1", "Clip skip": "1", "RNG": "GPU",
    }


def test_parse_infotext_treats_a_last_line_with_fewer_than_3_params_as_prompt():
    res = parse_infotext("a cat\nstyle: oil, mood: calm", fill_defaults=False)
    assert res == {"Prompt": "a cat\nstyle: oil, mood: calm", "Negative prompt": ""}


def test_parse_infotext_fills_a1111_defaults_only_when_asked():
    text = "a\nSteps: 1, Sampler: Euler, Seed: 3"
    assert parse_infotext(text)["Schedule type"] == "Automatic"
    assert "Schedule type" not in parse_infotext(text, fill_defaults=False)


def test_parse_infotext_multi_line_negative_prompt():
    res = parse_infotext("p1\np2\nNegative prompt: n1\nn2\nSteps: 1, Sampler: Euler, Seed: 3")
    assert (res["Prompt"], res["Negative prompt"]) == ("p1\np2", "n1\nn2")


ROUND_TRIP_CASES = [
    # (prompt, negative prompt, extra settings)
    ("a photo of a cat", "blurry, lowres", {}),
    ("line one,\nline two: with colon\nline three", "neg line 1\nneg line 2", {}),
    ("no negative here", "", {}),
    ("猫の写真, 東京, ümlaut ☃ — “quotes”", "ぼやけた", {}),
    ("(masterpiece:1.2), [blurry], a \\(literal\\) BREAK b", "(worst quality:1.4)", {}),
    ("commas in values", "", {"Hires upscaler": "Latent (nearest, exact)", "Note": 'say "hi": now\nbye'}),
]


@pytest.mark.parametrize("prompt,negative,extra", ROUND_TRIP_CASES)
def test_format_then_parse_round_trips(prompt, negative, extra, tmp_path):
    params = example_params(model_name="my, model: v1", extra=extra)
    text = format_infotext(prompt, negative, params)
    path = tmp_path / "img.png"
    save_png(Image.new("RGB", (16, 8), (10, 20, 30)), path, text)
    assert read_infotext(path) == text

    res = parse_infotext(read_infotext(path), fill_defaults=False)
    assert res["Prompt"] == prompt
    assert res["Negative prompt"] == negative
    expected = {k: str(v) for k, v in params.items() if v is not None and k != "Size"}
    expected.update({"Size-1": "512", "Size-2": "512"})
    assert {k: v for k, v in res.items() if k not in ("Prompt", "Negative prompt")} == expected


# --------------------------------------------------------------------------------------------
# PNG files
# --------------------------------------------------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG byte string."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def test_save_png_writes_a_parameters_text_chunk_and_no_exif():
    image = Image.new("RGB", (8, 8))
    image.info["exif"] = b"Exif\x00\x00junk"  # must not leak into the file
    image.info["comment"] = "other"
    buf = io.BytesIO()
    save_png(image, buf, "a cat\nSteps: 1, Sampler: Euler, Seed: 1")
    chunks = png_chunks(buf.getvalue())
    types = [t for t, _ in chunks]
    assert b"eXIf" not in types
    text_chunks = [p for t, p in chunks if t in (b"tEXt", b"iTXt", b"zTXt")]
    assert text_chunks == [b"parameters\x00a cat\nSteps: 1, Sampler: Euler, Seed: 1"]
    buf.seek(0)
    assert len(Image.open(buf).getexif()) == 0


def test_save_png_with_empty_text_writes_no_text_chunk():
    buf = io.BytesIO()
    save_png(Image.new("RGB", (8, 8)), buf, "")
    assert not [t for t, _ in png_chunks(buf.getvalue()) if t in (b"tEXt", b"iTXt", b"zTXt")]
    assert read_infotext(Image.open(io.BytesIO(buf.getvalue()))) is None


def test_save_png_stores_non_latin1_text_as_itxt_that_reads_back():
    buf = io.BytesIO()
    save_png(Image.new("RGB", (8, 8)), buf, "猫\nSteps: 1, Sampler: Euler, Seed: 1")
    assert b"iTXt" in [t for t, _ in png_chunks(buf.getvalue())]
    buf.seek(0)
    assert read_infotext(buf) == "猫\nSteps: 1, Sampler: Euler, Seed: 1"


def test_make_pnginfo_can_be_passed_to_pil_save():
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG", pnginfo=make_pnginfo("x\nSteps: 1, Sampler: Euler, Seed: 1"))
    buf.seek(0)
    assert read_infotext(Image.open(buf)) == "x\nSteps: 1, Sampler: Euler, Seed: 1"


def test_read_infotext_returns_none_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_infotext(path) is None


def test_sd_parsers_reads_back_a_png_written_by_save_png(tmp_path):
    import sd_parsers  # test-only dependency: a missing package must fail, not skip
    params = example_params(cfg_scale=7.5, seed=1234, width=640, height=448, schedule="Karras")
    path = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (640, 448)), path, format_infotext("a red fox, forest", "blurry, lowres", params))

    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == ["a red fox, forest"]
    assert [p.value for p in info.negative_prompts] == ["blurry, lowres"]
    (sampler,) = info.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert sampler.parameters["scheduler"] == "Karras"
    assert info.metadata["Size"] == "640x448"
    assert sampler.model.name == "v1-5-pruned-emaonly" and sampler.model.hash == "45dee52b"


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------


def test_model_hash_is_sha256_of_64k_at_offset_1m(tmp_path):
    data = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MiB, not a multiple of the block size
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, block_size=1000) == hashlib.sha256(data).hexdigest()
    assert short_hash(sha256_file(path)) == hashlib.sha256(data).hexdigest()[:10]


def test_model_hash_of_small_and_missing_files_matches_a1111(tmp_path):
    small = tmp_path / "small.ckpt"
    small.write_bytes(b"x" * 100)  # shorter than 1 MiB: A1111 hashes the empty read
    assert model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]
    assert model_hash(tmp_path / "missing.ckpt") == "NOFILE"


def test_parse_infotext_skips_keys_with_empty_values_like_a1111():
    res = parse_infotext("p\nSteps: 1, Model: , Sampler: Euler, Seed: 3", fill_defaults=False)
    assert "Model" not in res and res["Sampler"] == "Euler"


def test_extra_param_with_a_fixed_key_replaces_the_value_in_place():
    params = generation_params(steps=1, sampler="Euler", cfg_scale=1, seed=0, width=8, height=8,
                               extra={"Schedule type": "Karras", "Emphasis": "No norm"})
    assert list(params)[2:3] == ["Schedule type"] and params["Schedule type"] == "Karras"
    assert list(params)[-2:] == ["Emphasis", "Version"]
