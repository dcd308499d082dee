"""A1111 prompt syntax: attention parsing, 75-token chunks, and output weighting."""

import re

import pytest
import torch

from sdlite.errors import ArgumentError
from sdlite.prompt import (
    BOS_ID,
    COMMA_ID,
    EOS_ID,
    PromptChunk,
    apply_weights,
    chunks_to_tensors,
    count_tokens,
    empty_chunk,
    parse_prompt_attention,
    tokenize_prompt,
)

TOL = 1e-6


def assert_runs(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    for (_, w), (_, e) in zip(actual, expected):
        assert abs(w - e) < TOL, (actual, expected)


# --------------------------------------------------------------------------------------------
# parse_prompt_attention
# --------------------------------------------------------------------------------------------

PARSE_CASES = [
    # The doctests of A1111's modules/prompt_parser.py.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1),
        ],
    ),
    # Further rules.
    ("", [("", 1.0)]),
    ("((a))", [("a", 1.21)]),
    ("[[a]] b", [("a", 1 / 1.21), (" b", 1.0)]),
    ("(word:0.5)", [("word", 0.5)]),
    ("((word:2))", [("word", 2.2)]),
    ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.65), (" c", 1.1)]),
    ("[a", [("a", 1 / 1.1)]),
    ("((a) b", [("a", 1.21), (" b", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are text
    ("a: b", [("a: b", 1.0)]),  # a colon that is not a weight is text
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight without an open bracket is text
    (r"\(a\) \[b\] c\\d", [("(a) [b] c\\d", 1.0)]),
    (r"(\(a\))", [("(a)", 1.1)]),  # escaped brackets are weighted by the enclosing ones
    (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # a malformed weight is text (A1111 would raise)
    ("(a:-1)", [("a", -1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b, break c", [("aBREAK b, break c", 1.0)]),  # only the upper-case whole word
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a) BREAK b", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # Inside brackets BREAK's -1 is multiplied too, so it is no longer a break (as in A1111).
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_prompt_attention_follows_a1111_rules(text, expected):
    assert_runs(parse_prompt_attention(text), expected)


def test_parse_prompt_attention_reproduces_a1111_doctest_floats_exactly():
    runs = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    # A1111's doctest prints these exact float values (same multiplication order).
    assert runs["house"] == 1.5730000000000004
    assert runs["sky"] == 1.4641000000000006


def test_parse_prompt_attention_returns_str_float_tuples():
    runs = parse_prompt_attention("a (b)")
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in runs)
    assert all(isinstance(r, tuple) for r in runs)


# --------------------------------------------------------------------------------------------
# Chunking, with a stub encoder: one id per word, 267 for a comma.
# --------------------------------------------------------------------------------------------


class WordEncoder:
    """Maps each word to a stable id (>= 1000) and ',' to COMMA_ID; records every call."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls: list[str] = []

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 1000 + len(self.vocab))

    def __call__(self, text: str) -> list[int]:
        self.calls.append(text)
        return [COMMA_ID if w == "," else self.id(w) for w in re.findall(r"[^\s,]+|,", text)]


def words(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def content(chunk: PromptChunk, eos: int = EOS_ID) -> list[int]:
    """The ids between BOS and the first EOS."""
    return chunk.ids[1:chunk.ids.index(eos)]


def test_plain_prompt_gives_one_chunk_equal_to_plain_tokenization():
    enc = WordEncoder()
    text = "a photo of a cat, sitting on a mat, highly detailed"
    chunks = tokenize_prompt(text, enc)
    ids = enc(text)
    assert len(chunks) == 1
    assert chunks[0].ids == [BOS_ID] + ids + [EOS_ID] * (77 - 1 - len(ids))
    assert chunks[0].weights == [1.0] * 77
    assert enc.calls[0] == text  # encoded in one piece, exactly as without the parser


def test_plain_prompt_of_exactly_75_tokens_is_one_full_chunk():
    enc = WordEncoder()
    text = " ".join(words(75))
    chunks = tokenize_prompt(text, enc)
    assert len(chunks) == 1
    assert chunks[0].ids == [BOS_ID] + enc(text) + [EOS_ID]


def test_sd2_padding_puts_pad_id_after_the_first_eos():
    enc = WordEncoder()
    chunks = tokenize_prompt("a cat", enc, pad=0)
    assert chunks[0].ids == [BOS_ID, enc.id("a"), enc.id("cat"), EOS_ID] + [0] * 73
    assert chunks[0].weights == [1.0] * 77


def test_empty_prompt_gives_one_chunk_of_bos_and_eos():
    assert tokenize_prompt("", WordEncoder()) == [PromptChunk([BOS_ID] + [EOS_ID] * 76, [1.0] * 77)]
    sd2 = tokenize_prompt("", WordEncoder(), pad=0)
    assert sd2[0].ids == [BOS_ID, EOS_ID] + [0] * 75
    assert empty_chunk() == tokenize_prompt("", WordEncoder())[0]
    assert empty_chunk(pad=0) == sd2[0]


def test_each_parsed_run_is_encoded_separately():
    enc = WordEncoder()
    tokenize_prompt("a (b c) d", enc)
    assert enc.calls == ["a ", "b c", " d"]


def test_weights_follow_their_tokens():
    enc = WordEncoder()
    (chunk,) = tokenize_prompt("a (b c:1.5) [d]", enc)
    assert chunk.ids[:6] == [BOS_ID, enc.id("a"), enc.id("b"), enc.id("c"), enc.id("d"), EOS_ID]
    assert chunk.weights[:6] == pytest.approx([1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0], abs=TOL)
    assert chunk.weights[6:] == [1.0] * 71


def test_long_prompt_without_commas_is_cut_every_75_tokens():
    enc = WordEncoder()
    ws = words(160)
    chunks = tokenize_prompt(" ".join(ws), enc)
    assert len(chunks) == 3
    assert all(len(c.ids) == 77 and len(c.weights) == 77 for c in chunks)
    assert chunks[0].ids == [BOS_ID] + [enc.id(w) for w in ws[:75]] + [EOS_ID]
    assert chunks[1].ids == [BOS_ID] + [enc.id(w) for w in ws[75:150]] + [EOS_ID]
    assert content(chunks[2]) == [enc.id(w) for w in ws[150:]]
    assert chunks[2].ids[11:] == [EOS_ID] * 66


def test_comma_within_20_tokens_of_a_full_chunk_moves_the_rest_to_the_next_chunk():
    enc = WordEncoder()
    first, second = words(70, "a"), words(10, "b")
    chunks = tokenize_prompt(" ".join(first) + ", " + " ".join(second), enc)
    assert len(chunks) == 2
    # Chunk 1 ends at the comma (70 words + comma = 71 tokens) and is padded with EOS.
    assert chunks[0].ids == [BOS_ID] + [enc.id(w) for w in first] + [COMMA_ID] + [EOS_ID] * 5
    # The 4 words that had followed the comma in chunk 1 start chunk 2.
    assert content(chunks[1]) == [enc.id(w) for w in second]


def test_moved_tokens_keep_their_weights():
    enc = WordEncoder()
    text = " ".join(words(70, "a")) + ", (" + " ".join(words(10, "b")) + ")"
    chunks = tokenize_prompt(text, enc)
    assert chunks[1].weights[1:11] == pytest.approx([1.1] * 10, abs=TOL)
    assert chunks[1].weights[11:] == [1.0] * 66


def test_comma_farther_than_20_tokens_does_not_move_text():
    enc = WordEncoder()
    first, second = words(50, "a"), words(30, "b")
    chunks = tokenize_prompt(" ".join(first) + ", " + " ".join(second), enc)
    assert chunks[0].ids[1:76] == [enc.id(w) for w in first] + [COMMA_ID] + [enc.id(w) for w in second[:24]]
    assert content(chunks[1]) == [enc.id(w) for w in second[24:]]


def test_comma_backtrack_zero_disables_the_comma_rule():
    enc = WordEncoder()
    first, second = words(70, "a"), words(10, "b")
    chunks = tokenize_prompt(" ".join(first) + ", " + " ".join(second), enc, comma_backtrack=0)
    assert chunks[0].ids[72:76] == [enc.id(w) for w in second[:4]]


def test_comma_exactly_at_a_full_chunk_starts_the_next_chunk():
    enc = WordEncoder()
    chunks = tokenize_prompt(" ".join(words(75)) + ", x", enc)
    assert content(chunks[1]) == [COMMA_ID, enc.id("x")]


def test_break_starts_a_new_chunk():
    enc = WordEncoder()
    chunks = tokenize_prompt("a cat BREAK a dog", enc)
    assert len(chunks) == 2
    assert content(chunks[0]) == [enc.id("a"), enc.id("cat")]
    assert content(chunks[1]) == [enc.id("a"), enc.id("dog")]
    assert "BREAK" not in enc.calls


def test_leading_break_gives_an_empty_first_chunk_and_trailing_break_adds_nothing():
    enc = WordEncoder()
    lead = tokenize_prompt("BREAK a", enc)
    assert lead[0] == empty_chunk() and content(lead[1]) == [enc.id("a")]
    assert len(tokenize_prompt("a BREAK", enc)) == 1


def test_break_inside_brackets_is_ordinary_text():
    enc = WordEncoder()
    (chunk,) = tokenize_prompt("(a BREAK b)", enc)
    assert content(chunk) == [enc.id("a"), enc.id("BREAK"), enc.id("b")]


def test_count_tokens_matches_the_a1111_counter():
    enc = WordEncoder()
    assert count_tokens("", enc) == (0, 75)
    assert count_tokens("a b c", enc) == (3, 75)
    assert count_tokens(" ".join(words(75)), enc) == (75, 75)
    assert count_tokens(" ".join(words(100)), enc) == (100, 150)
    assert count_tokens("a BREAK b", enc) == (76, 150)  # a broken chunk counts as full


def test_chunks_to_tensors_stacks_ids_and_weights():
    ids, weights = chunks_to_tensors(tokenize_prompt(" ".join(words(80)), WordEncoder()))
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert weights.shape == (2, 77) and weights.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# apply_weights
# --------------------------------------------------------------------------------------------


def a1111_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """EmphasisOriginal.after_transformers on one prompt's chunk, as the doc states it."""
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def test_apply_weights_returns_the_input_itself_when_all_weights_are_one():
    z = torch.randn(2, 154, 16)
    out = apply_weights(z, torch.ones(2, 154))
    assert out is z


def test_apply_weights_matches_a1111_per_chunk_and_preserves_each_chunk_mean():
    torch.manual_seed(0)
    z = torch.randn(2, 154, 16) + 0.3
    w = torch.ones(2, 154)
    w[0, 3:7] = 1.21
    w[1, 80:90] = 0.5
    out = apply_weights(z, w)
    for b in range(2):
        for k in range(2):
            s = slice(77 * k, 77 * (k + 1))
            ref = a1111_emphasis(z[b:b + 1, s], w[b:b + 1, s])
            torch.testing.assert_close(out[b:b + 1, s], ref, rtol=0, atol=1e-6)
            assert out[b, s].mean().item() == pytest.approx(z[b, s].mean().item(), abs=1e-6)
    # Chunks whose weights are all 1 come back unchanged.
    assert torch.equal(out[0, 77:], z[0, 77:])
    assert torch.equal(out[1, :77], z[1, :77])


def test_apply_weights_scales_the_weighted_tokens_relative_to_the_others():
    z = torch.ones(1, 77, 4)
    w = torch.ones(1, 77)
    w[0, 5] = 2.0
    out = apply_weights(z, w)
    assert out[0, 5, 0].item() == pytest.approx(2 * out[0, 6, 0].item(), rel=1e-6)


def test_apply_weights_keeps_dtype_and_does_not_modify_inputs():
    z = torch.randn(1, 77, 8, dtype=torch.float16)
    w = torch.ones(77)
    w[2] = 1.1
    z_copy, w_copy = z.clone(), w.clone()
    out = apply_weights(z, w)
    assert out.dtype == torch.float16 and out.shape == z.shape
    assert torch.equal(z, z_copy) and torch.equal(w, w_copy)


def test_apply_weights_rejects_a_partial_chunk():
    with pytest.raises(ArgumentError):
        apply_weights(torch.randn(1, 70, 8), torch.full((1, 70), 1.1))


# --------------------------------------------------------------------------------------------
# With the real CLIP tokenizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_id", [EOS_ID, 0])
def test_plain_prompt_chunk_equals_the_clip_tokenizer_output(pad_id):
    from sdlite.clip.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer(pad_id=pad_id)
    text = "a photograph of an astronaut riding a horse, highly detailed, 8k"
    (chunk,) = tokenize_prompt(text, tok.encode, pad=pad_id)
    assert chunk.ids == tok([text])[0].tolist()
    assert chunk.weights == [1.0] * 77
    # Emphasis changes only the weights: the ids are those of the prompt without the syntax.
    (weighted,) = tokenize_prompt("a photograph of an (astronaut:1.3) riding a [horse], highly detailed, 8k",
                                  tok.encode, pad=pad_id)
    assert weighted.ids == chunk.ids
    assert weighted.weights != chunk.weights
