"""The CLIP byte-level BPE tokenizer (OpenAI ``SimpleTokenizer``), on the Rust ``tokenizers`` library.

Both text encoders of Stable Diffusion use the same vocabulary: 49,408 ids built from the merge
list ``assets/clip/bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI CLIP does:

* ids 0..255: the 256 byte values, each written as a printable stand-in character
  (``bytes_to_unicode``), so any UTF-8 text can be spelled;
* ids 256..511: the same characters with the end-of-word marker ``</w>`` appended;
* ids 512..49405: one token per merge rule, in rank order (48,894 merges);
* 49406 ``<|startoftext|>`` (BOS) and 49407 ``<|endoftext|>`` (EOS).

Text pipeline, as in OpenAI's ``basic_clean`` / ``whitespace_clean``:

1. ``clean_text`` in Python: HTML unescaping (twice), the ``ftfy`` fixes that matter for prompts
   (curly quotes to ASCII, full-width forms to normal width), NFC, whitespace collapse, lowercase;
2. the Rust pipeline: split into pieces with CLIP's regex (contractions, runs of letters, *single*
   digits, runs of other symbols), map each piece's UTF-8 bytes to the stand-in characters, and run
   BPE with ``</w>`` on the last symbol of each piece.

The literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a prompt map to the special ids,
as OpenAI's original tokenizer and Hugging Face's ``CLIPTokenizer`` do.

Example::

    >>> tok = CLIPTokenizer()
    >>> tok.encode("a photo of a cat")
    [320, 1125, 539, 320, 2368]
    >>> tok(["a photo of a cat"]).shape
    torch.Size([1, 77])
"""

from __future__ import annotations

import functools
import gzip
import html
import unicodedata
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
END_OF_WORD = "</w>"
# 49152 tokens in the original BPE training minus the 256 byte tokens minus the 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
# OpenAI's split regex without its two special-token alternatives (those are matched as added
# tokens before splitting). Text is lowercased first, so its IGNORECASE flag changes nothing.
SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte value to a printable character (the GPT-2 / CLIP byte alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    U+0100 onwards in byte order, so no stand-in is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


# The ftfy.fix_text steps that OpenAI's basic_clean relies on for everyday prompts, as
# str.translate tables (ftfy itself is not a runtime dependency).
_UNCURL_QUOTES = {
    **{cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},  # ʼ ‘ ’ ‚ ‛
    **{cp: '"' for cp in (0x201C, 0x201D, 0x201E, 0x201F)},  # “ ” „ ‟
}
# Half-width and full-width forms (U+FF01..U+FFEF: "ＡＢＣ", "１２３", "ｶﾀｶﾅ") to their normal-width
# characters, and the ideographic space U+3000 to a plain space.
_NORMAL_WIDTH = {0x3000: " "}
for _cp in range(0xFF01, 0xFFF0):
    _normal = unicodedata.normalize("NFKC", chr(_cp))
    if _normal != chr(_cp):
        _NORMAL_WIDTH[_cp] = _normal
_TEXT_FIXES = {**_NORMAL_WIDTH, **_UNCURL_QUOTES}


def clean_text(text: str) -> str:
    """Normalize a prompt the way OpenAI CLIP does before splitting it into pieces.

    ``"&amp; “Hi”   THERE"`` -> ``"& \\"hi\\" there"``. Mojibake repair and ftfy's other rare
    fixes are not done.
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(_TEXT_FIXES))
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=None)
def build_tokenizer(bpe_path: str = str(BPE_PATH)) -> Tokenizer:
    """Build the Rust tokenizer from the merge list (once per process: ~0.2 s)."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header

    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == BOS_ID, "the merge list must add exactly 48,894 distinct tokens"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True: the regex matches are the pieces; what lies between (whitespace) is dropped.
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # normalized=False: clean_text has already lowercased the text.
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)])
    assert tok.token_to_id(BOS_TOKEN) == BOS_ID and tok.token_to_id(EOS_TOKEN) == EOS_ID
    return tok


class CLIPTokenizer:
    """Prompts to the fixed-length id tensors the CLIP text encoders take.

    ``pad_id`` differs between the two SD versions: SD1 (Hugging Face ``CLIPTokenizer``) pads with
    EOS 49407, SD2 (``open_clip.tokenize``) pads with 0.
    """

    def __init__(self, pad_id: int = EOS_ID, max_length: int = 77) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.bos_id = BOS_ID
        self.eos_id = EOS_ID
        self.pad_id = pad_id
        self.max_length = max_length
        self._tok = build_tokenizer()

    def encode(self, text: str) -> list[int]:
        """Content ids of one prompt: no BOS/EOS, no truncation (long-prompt chunking uses this)."""
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Ids back to the cleaned text, one space after each piece; special ids are dropped."""
        out = bytearray()
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            token = self._tok.id_to_token(i)
            word_end = token.endswith(END_OF_WORD)
            out += bytes(_BYTE_OF_CHAR[c] for c in token.removesuffix(END_OF_WORD))
            out += b" " if word_end else b""
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """``[B, max_length]`` int64: BOS, the first ``max_length - 2`` content ids, EOS, padding.

        A truncated prompt therefore still ends with EOS at position ``max_length - 1``, as in
        the original ``FrozenCLIPEmbedder`` / ``open_clip.tokenize``.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        # One encode per prompt rather than the library's encode_batch: that one starts a thread
        # pool, which makes later fork()s (DataLoader workers) warn and disable it.
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
