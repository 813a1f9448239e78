"""serving/detokenizer.py: text grown a token at a time equals decoding the whole sequence,
for every tokenizer kind, with multi-byte characters split across tokens and stop strings
split across pieces."""

from __future__ import annotations

import numpy as np
import pytest

from data import tokenization
from serving.detokenizer import IncrementalText

TEXT = (
    "Thou art the king, my lord — speak of love! Ωμέγα, naïve café, 東京 and 🙂 emoji.\n"
    "The king and thou: to me of love; speak, lord."
) * 6


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, tokenization.Tokenizer]:
    return {
        "byte": tokenization.ByteTokenizer(),
        "char": tokenization.CharTokenizer.from_text(TEXT),
        "bpe": tokenization.BPETokenizer.train(iter([TEXT] * 4), vocab_size=300),
        "sentencepiece": tokenization.SentencePieceTokenizer.train(TEXT * 4, vocab_size=400),
    }


def _grow(tokenizer, ids, stop=(), every=1):
    """Feeds ids `every` at a time; returns the IncrementalText and every text it showed."""
    out = IncrementalText(tokenizer, tuple(stop))
    seen = []
    for i, token in enumerate(ids):
        out.token_ids.append(int(token))
        if (i + 1) % every == 0:
            out.update()
            seen.append(out.text[: out.stable_length()])
            if out.stop_at is not None:
                break
    out.update(final=True)
    return out, seen


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "sentencepiece"])
@pytest.mark.parametrize("every", [1, 3])
def test_grown_text_is_the_whole_decoding(tokenizers, kind, every) -> None:
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(TEXT)
    whole = tokenizer.decode(ids)
    out, seen = _grow(tokenizer, ids, every=every)
    assert out.text == whole
    for shown in seen:  # never a character that later changes, never a U+FFFD of a split one
        assert whole.startswith(shown)


def test_random_bytes_match_whole_decoding() -> None:
    """A byte model may generate any bytes: invalid sequences become U+FFFD exactly as decoding
    the whole sequence makes them, and an incomplete character at the end is held back."""
    tokenizer = tokenization.ByteTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, 256, size=int(rng.integers(1, 40)))
        out, seen = _grow(tokenizer, ids)
        whole = tokenizer.decode(ids)
        assert out.text == whole
        assert all(whole.startswith(s) for s in seen)
    partial = IncrementalText(tokenizer)
    partial.token_ids.append("é".encode()[0])
    partial.update()
    assert partial.text == ""  # the first byte of a two-byte character waits
    partial.token_ids.append("é".encode()[1])
    partial.update()
    assert partial.text == "é"


@pytest.mark.parametrize("kind", ["byte", "bpe", "sentencepiece"])
def test_stop_strings_found_across_pieces(tokenizers, kind) -> None:
    """A stop string ends the text before it (here the first to complete is also the first to
    start, as in most uses), wherever the pieces
    split it, and nothing past it was ever shown."""
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(TEXT)
    whole = tokenizer.decode(ids)
    for stop in [("lord —",), ("café, 東",), ("zzz", "speak, lord"), ("of love", "ng, my")]:
        expected = min(whole.find(s) for s in stop if s in whole)
        out, seen = _grow(tokenizer, ids, stop)
        assert out.stop_at == expected, stop
        assert out.text == whole[:expected]
        assert all(len(s) <= expected for s in seen)
    out, _ = _grow(tokenizer, ids, ("not in the text",))
    assert out.stop_at is None and out.text == whole
