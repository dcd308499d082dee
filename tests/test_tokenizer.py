"""Golden-value tests of the CLIP tokenizer.

The reference ids (tests/data/reference_ids.json) come from OpenAI/open_clip's pure-Python
``SimpleTokenizer`` with ftfy, cross-checked with transformers' ``CLIPTokenizer``; they include
BOS/EOS and are neither padded nor truncated.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from sdlite.clip import CLIPTokenizer, tokenizer_for
from sdlite.clip.tokenizer import clean_text
from sdlite.config import SD1_TEXT, SD2_TEXT

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_ids.json").read_text(encoding="utf-8"))
BOS, EOS = 49406, 49407


def _expected_ids(entry: dict) -> list[int]:
    # The literal "<|startoftext|>" prompt is ambiguous: open_clip 3.x BPE-encodes the text, OpenAI's
    # original tokenizer and Hugging Face's map it to the special ids. We follow OpenAI/HF.
    return entry.get("hf4_slow_ftfy_ids", entry["ids"])


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.mark.parametrize("entry", REFERENCE, ids=[f"{i}:{e['text'][:24]}" for i, e in enumerate(REFERENCE)])
def test_encode_matches_openai_reference_ids(tok: CLIPTokenizer, entry: dict) -> None:
    assert [BOS, *tok.encode(entry["text"]), EOS] == _expected_ids(entry)


def test_anchor_prompt_gives_documented_ids(tok: CLIPTokenizer) -> None:
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("") == []


def test_literal_special_tokens_map_to_bos_and_eos_ids(tok: CLIPTokenizer) -> None:
    assert tok.encode("<|startoftext|>x<|endoftext|>") == [BOS, *tok.encode("x"), EOS]


def test_sd1_pads_with_eos_and_sd2_pads_with_zero() -> None:
    sd1, sd2 = tokenizer_for(SD1_TEXT), tokenizer_for(SD2_TEXT)
    head = [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert sd1("a photo of a cat")[0].tolist() == head + [EOS] * 70
    assert sd2("a photo of a cat")[0].tolist() == head + [0] * 70
    assert (sd1.pad_id, sd2.pad_id, sd1.max_length) == (EOS, 0, 77)


@pytest.mark.parametrize("n_tokens", [110, 121])
def test_long_prompt_is_truncated_to_75_tokens_with_eos_at_position_76(n_tokens: int) -> None:
    entry = next(e for e in REFERENCE if e["n_tokens"] == n_tokens)
    for pad_id in (EOS, 0):
        row = CLIPTokenizer(pad_id=pad_id)(entry["text"])[0].tolist()
        assert row == entry["ids"][:76] + [EOS]


def test_batch_is_int64_of_shape_batch_by_max_length(tok: CLIPTokenizer) -> None:
    texts = [e["text"] for e in REFERENCE]
    ids = tok(texts)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 77)
    assert (ids[:, 0] == BOS).all()
    short = CLIPTokenizer(pad_id=0, max_length=8)(["a photo of a cat", "a b c d e f g h"])
    assert short.tolist() == [[BOS, 320, 1125, 539, 320, 2368, EOS, 0], [BOS, 320, 321, 322, 323, 324, 325, EOS]]


def test_decode_inverts_encode_on_cleaned_text(tok: CLIPTokenizer) -> None:
    assert tok.decode(tok.encode("A Photo of a CAT, café!")) == "a photo of a cat , café !"


def test_clean_text_agrees_with_ftfy_on_quotes_width_entities_and_spaces() -> None:
    # ftfy is only a test dependency; it imports wcwidth, which it needs only for terminal
    # display, so a throwaway stub stands in where wcwidth is not installed.
    stub_wcwidth = importlib.util.find_spec("wcwidth") is None
    if stub_wcwidth:
        stub = types.ModuleType("wcwidth")
        stub.wcwidth, stub.wcswidth = (lambda c: 1), (lambda s: len(s))
        sys.modules["wcwidth"] = stub
    try:
        import ftfy
    finally:
        if stub_wcwidth:
            sys.modules.pop("wcwidth", None)
    import html

    samples = [
        "“smart” ‘single’ ‚low‛ „double low‟ ʼn",
        "ＬＯＵＤ　ＮＯＩＳＥＳ ｶﾀｶﾅ Ａ１２３，！",
        "&amp; &lt;tag&gt; &quot;q&quot; &amp;amp;",
        "  Tabs\tand\nnew  lines  ",
        "Ærøskøbing STRASSE e\u0301",
    ]
    for text in samples:
        reference = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == reference, text
