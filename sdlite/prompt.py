"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, and 75-token chunks.

Written from A1111's documented rules (``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py``,
``modules/sd_emphasis.py``) so that a prompt gives the same token ids and weights as in A1111:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.21, ``(text:1.3)`` by 1.3,
  ``[text]`` divides it by 1.1; ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal characters;
  brackets left open are closed at the end of the prompt.
- ``BREAK`` (upper case, a word of its own) ends the current chunk.
- The prompt is cut into chunks of 75 tokens; each chunk is encoded on its own as
  ``[BOS] + 75 tokens + [EOS]`` and the encodings are concatenated (``[B, 77*k, C]``), which lifts
  CLIP's 77-token limit. A chunk that fills up moves the words after its last comma (if that comma
  is within 20 tokens of the end) into the next chunk, so words are not cut apart.
- The weights scale the text encoder's *output*, then the mean of each chunk's encoding is restored
  (:func:`apply_weights`).

A plain prompt (no brackets, no BREAK, at most 75 tokens) gives exactly the ids of plain
tokenization and all weights 1.0, so it conditions the model exactly as without this module.

Not supported: A1111's prompt editing (``[from:to:when]``), alternation (``[a|b]``) and composable
prompts (``a AND b``). They are read as text, as above; :func:`unsupported_syntax` finds them, and the
pipeline warns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlite.errors import ArgumentError

__all__ = [
    "parse_prompt_attention",
    "unsupported_syntax",
    "PromptChunk",
    "tokenize_prompt",
    "count_tokens",
    "empty_chunk",
    "chunks_to_tensors",
    "apply_weights",
    "BOS_ID",
    "EOS_ID",
    "COMMA_ID",
    "CHUNK_LENGTH",
]

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
COMMA_ID = 267  # ",</w>" in the CLIP vocabulary
CHUNK_LENGTH = 75  # content tokens per chunk; a chunk is 77 ids with BOS and EOS

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per token kind, tried in this order (order matters: escapes before brackets,
# ":<number>)" before a lone ":" or ")"). Group 1 is the number of an explicit weight.
_RE_ATTENTION = re.compile(
    r"""
    \\\(            # escaped (
    | \\\)          # escaped )
    | \\\[          # escaped [
    | \\]           # escaped ]
    | \\\\          # escaped backslash
    | \\            # a lone backslash (dropped)
    | \(
    | \[
    | :([+-]?[.\d]+)\)   # ":1.3)" closes a round bracket with an explicit weight
    | \)
    | ]
    | [^\\()\[\]:]+ # plain text
    | :             # a colon that is not a weight
    """,
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


# A1111's per-step prompt syntax (modules/prompt_parser.py's schedule grammar, and its AND), which sdlite
# does not run: [from:to:when], [to:when], [from::when], [a|b|...], and "AND" between words.
_UNSUPPORTED = {
    "prompt editing [from:to:when]": re.compile(r"(?<!\\)\[[^\[\]]*:\s*[\d.]+\s*\]"),
    "alternation [a|b]": re.compile(r"(?<!\\)\[[^\[\]:]*\|[^\[\]]*\]"),
    "composable prompts (AND)": re.compile(r"(?:^|\s)AND(?:\s|$)"),
}


def unsupported_syntax(prompt: str) -> list[str]:
    """The A1111 syntax in ``prompt`` that sdlite reads as plain text instead of running it (see above).

    >>> unsupported_syntax("a [cat:dog:0.5] AND a [red|blue] hat"), unsupported_syntax("a (cat:1.2) [dog]")
    (['prompt editing [from:to:when]', 'alternation [a|b]', 'composable prompts (AND)'], [])
    """
    return [name for name, pattern in _UNSUPPORTED.items() if pattern.search(prompt)]


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` runs following A1111's emphasis syntax.

    Adjacent runs of equal weight are merged; an empty prompt gives ``[("", 1.0)]``; each ``BREAK``
    gives ``("BREAK", -1.0)``. As in A1111, a BREAK inside brackets gets its -1 multiplied and is
    then ordinary text, and unmatched ``)``, ``]`` or ``:`` are kept as text.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("(unbalanced")
    [('unbalanced', 1.1)]
    >>> parse_prompt_attention(r"\\(literal\\]")
    [('(literal]', 1.0)]
    """
    # Lists (not tuples) while parsing: a closing bracket multiplies every run since its opener.
    runs: list[list] = []
    open_round: list[int] = []  # index into runs where each still-open "(" started
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round and _is_float(weight):
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])

    # Unclosed brackets act as if closed at the end; innermost last, as A1111 does.
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    if not runs:
        runs = [["", 1.0]]

    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


def _is_float(s: str) -> bool:
    # The weight regex also matches "1.2.3" or "."; A1111 would crash there, we keep it as text.
    try:
        float(s)
    except ValueError:
        return False
    return True


@dataclass
class PromptChunk:
    """One 77-token piece of a prompt: ``ids`` for the text encoder and the per-token ``weights``
    (1.0 at BOS, EOS and padding)."""

    ids: list[int]
    weights: list[float]


def empty_chunk(
    bos: int = BOS_ID, eos: int = EOS_ID, pad: int = EOS_ID, chunk_length: int = CHUNK_LENGTH
) -> PromptChunk:
    """The chunk of an empty prompt, used to pad a batch whose prompts have fewer chunks."""
    return _finish([], [], bos, eos, pad, chunk_length)


def _finish(
    ids: list[int], weights: list[float], bos: int, eos: int, pad: int, chunk_length: int
) -> PromptChunk:
    """Fill the content to ``chunk_length`` with EOS and frame it with BOS/EOS (A1111's
    ``next_chunk``); then, where the pad id differs from EOS (SD2's OpenCLIP pads with 0), set
    everything after the first EOS to the pad id (A1111's ``process_tokens``)."""
    fill = chunk_length - len(ids)
    full_ids = [bos] + ids + [eos] * fill + [eos]
    full_weights = [1.0] + weights + [1.0] * fill + [1.0]
    if pad != eos:
        first_eos = full_ids.index(eos)
        full_ids[first_eos + 1:] = [pad] * (len(full_ids) - first_eos - 1)
    return PromptChunk(full_ids, full_weights)


def _chunk_prompt(
    text: str,
    encode: Callable[[str], list[int]],
    bos: int,
    eos: int,
    pad: int,
    chunk_length: int,
    comma_id: int,
    comma_backtrack: int,
) -> tuple[list[PromptChunk], int]:
    """A1111's ``tokenize_line``: the chunks and the token count shown by the UI counter."""
    chunks: list[PromptChunk] = []
    ids: list[int] = []  # content of the chunk being filled
    weights: list[float] = []
    last_comma = -1  # position of the last comma in ``ids``, -1 if none
    token_count = 0

    def next_chunk(is_last: bool = False) -> None:
        nonlocal ids, weights, last_comma, token_count
        # A full chunk counts 75; the last one only its real tokens.
        token_count += len(ids) if is_last else chunk_length
        chunks.append(_finish(ids, weights, bos, eos, pad, chunk_length))
        ids, weights, last_comma = [], [], -1

    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == -1:
            next_chunk()  # even when the current chunk is empty, as A1111 does
            continue
        for token in encode(fragment):
            if token == comma_id:
                last_comma = len(ids)
            elif (
                comma_backtrack != 0
                and len(ids) == chunk_length
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                # The chunk is full and a comma is close: move what follows it to the next chunk.
                keep = last_comma + 1
                moved_ids, moved_weights = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                next_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == chunk_length:
                next_chunk()
            ids.append(token)
            weights.append(weight)

    if ids or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def tokenize_prompt(
    text: str,
    encode: Callable[[str], list[int]],
    bos: int = BOS_ID,
    eos: int = EOS_ID,
    pad: int = EOS_ID,
    chunk_length: int = CHUNK_LENGTH,
    comma_id: int = COMMA_ID,
    comma_backtrack: int = 20,
) -> list[PromptChunk]:
    """Parse ``text`` and cut it into chunks of ``chunk_length + 2`` ids with their weights.

    ``encode`` is the tokenizer's content-only encoding (no BOS/EOS); it is called once per
    parsed run of equal weight, as A1111 does. ``pad`` is the id after the first EOS: EOS itself
    for SD1's CLIP, 0 for SD2's OpenCLIP. ``comma_backtrack=0`` disables the comma rule.
    An empty prompt gives one chunk ``[BOS, EOS, pad, ...]``.

    >>> words = {"a": 1, "cat": 2}
    >>> [c.ids[:4] for c in tokenize_prompt("a BREAK cat", lambda s: [words[w] for w in s.split()])]
    [[49406, 1, 49407, 49407], [49406, 2, 49407, 49407]]
    """
    chunks, _ = _chunk_prompt(text, encode, bos, eos, pad, chunk_length, comma_id, comma_backtrack)
    return chunks


def count_tokens(
    text: str,
    encode: Callable[[str], list[int]],
    chunk_length: int = CHUNK_LENGTH,
    comma_id: int = COMMA_ID,
    comma_backtrack: int = 20,
) -> tuple[int, int]:
    """The UI token counter: ``(tokens used, limit before another chunk is needed)``.

    Full chunks before the last count ``chunk_length`` each (so BREAK and the comma rule use up
    tokens); the limit is ``ceil(max(n, 1) / 75) * 75``.

    >>> count_tokens("a b c", lambda s: [1] * len(s.split()))
    (3, 75)
    """
    _, n = _chunk_prompt(text, encode, BOS_ID, EOS_ID, EOS_ID, chunk_length, comma_id, comma_backtrack)
    return n, math.ceil(max(n, 1) / chunk_length) * chunk_length


def chunks_to_tensors(chunks: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack chunks into ``ids`` [k, 77] (int64) and ``weights`` [k, 77] (float32)."""
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
    return ids, weights


def apply_weights(z: torch.Tensor, weights: torch.Tensor, chunk_tokens: int = CHUNK_LENGTH + 2) -> torch.Tensor:
    """Scale the text encoding by the prompt weights, keeping each chunk's mean (A1111 "Original").

    ``z``: [B, 77*k, C] text-encoder output (chunks concatenated along tokens);
    ``weights``: [B, 77*k] (or [77*k], shared by the batch). For every sample and every 77-token
    chunk ``zc``::

        zc' = zc * w[..., None] * (zc.mean() / (zc * w[..., None]).mean())

    A1111 encodes each prompt and each chunk separately, so its ``z.mean()`` is exactly this
    per-sample, per-chunk mean. The arithmetic is done in float32 and the result has ``z``'s dtype.
    When every weight is 1.0 the input tensor itself is returned, bit for bit.

    >>> z = torch.randn(1, 77, 8)
    >>> apply_weights(z, torch.ones(1, 77)) is z
    True
    """
    if bool((weights == 1.0).all()):
        return z
    b, t, c = z.shape
    if t % chunk_tokens != 0:
        raise ArgumentError(f"apply_weights: {t} tokens is not a multiple of {chunk_tokens}; pass whole chunks")
    if weights.shape[-1] != t:
        raise ArgumentError(f"apply_weights: weights have {weights.shape[-1]} tokens but z has {t}")
    k = t // chunk_tokens
    zc = z.float().reshape(b, k, chunk_tokens, c)
    w = weights.to(device=z.device, dtype=torch.float32).expand(b, t).reshape(b, k, chunk_tokens, 1)
    original_mean = zc.mean(dim=(2, 3), keepdim=True)
    weighted = zc * w
    weighted = weighted * (original_mean / weighted.mean(dim=(2, 3), keepdim=True))
    return weighted.reshape(b, t, c).to(z.dtype)
