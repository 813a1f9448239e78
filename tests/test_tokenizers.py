"""Tests for data.tokenization: char, byte and SentencePiece tokenizers and their persistence."""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import (
    sources,  # noqa: E402
    tokenization,  # noqa: E402
)

NANOGPT_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NON_ASCII = "Ça va? naïve café — 日本語 🙂\n  two  spaces\ttab\r\nend "
SP_TRAIN_CHARS = 300_000


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """Returns the Tiny Shakespeare text (prepared in default_data_dir() if needed)."""
    data_dir = sources.default_data_dir()
    sources.prepare_tiny_shakespeare(data_dir)
    return sources.load_text_corpus("tiny_shakespeare", data_dir)


@pytest.fixture(scope="session", params=["bpe", "unigram"])
def sp_tokenizer(
    request: pytest.FixtureRequest, shakespeare: str
) -> tokenization.SentencePieceTokenizer:
    """Returns a SentencePiece tokenizer trained on part of Tiny Shakespeare."""
    return tokenization.SentencePieceTokenizer.train(
        shakespeare[:SP_TRAIN_CHARS], vocab_size=1024, model_type=request.param
    )


def test_char_vocabulary_is_nanogpt(shakespeare: str) -> None:
    """The char vocabulary and stoi/itos match nanoGPT's shakespeare_char prepare.py."""
    tok = tokenization.CharTokenizer.from_text(shakespeare)
    assert tok.vocab_size == 65
    assert tok.chars == NANOGPT_CHARS
    assert tok.stoi == {ch: i for i, ch in enumerate(NANOGPT_CHARS)}
    assert tok.itos == dict(enumerate(NANOGPT_CHARS))


def test_char_round_trip(shakespeare: str) -> None:
    """Encoding the whole corpus gives int32 ids in range that decode back exactly."""
    tok = tokenization.CharTokenizer.from_text(shakespeare)
    ids = tok.encode(shakespeare)
    assert ids.dtype == np.int32 and ids.shape == (len(shakespeare),)
    assert ids.min() >= 0 and ids.max() < 65
    assert ids[:5].tolist() == [tok.stoi[c] for c in "First"]
    assert tok.decode(ids) == shakespeare
    assert tok.decode(ids.tolist()[:14]) == "First Citizen:"
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_char_out_of_vocabulary_error(shakespeare: str) -> None:
    """Unknown characters raise ValueError naming them and where the vocabulary comes from."""
    tok = tokenization.CharTokenizer.from_text(shakespeare)
    with pytest.raises(ValueError, match="training corpus") as info:
        tok.encode("hello wörld €5 wörld")
    message = str(info.value)
    assert "'ö'" in message and "'€'" in message and "'5'" in message
    assert "3 character(s)" in message


def test_char_decode_rejects_bad_ids() -> None:
    """Ids outside the vocabulary raise ValueError."""
    tok = tokenization.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])


def test_byte_round_trip() -> None:
    """Bytes encode any text, including non-ASCII, and decode back exactly."""
    tok = tokenization.ByteTokenizer()
    assert tok.vocab_size == 256
    ids = tok.encode(NON_ASCII)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(NON_ASCII.encode("utf-8"))
    assert tok.decode(ids) == NON_ASCII


def test_byte_decode_replaces_invalid_utf8() -> None:
    """A truncated multi-byte character decodes to U+FFFD instead of raising."""
    tok = tokenization.ByteTokenizer()
    ids = tok.encode("é")[:1]
    assert tok.decode(ids) == "\ufffd"


def test_sentencepiece_round_trip(
    sp_tokenizer: tokenization.SentencePieceTokenizer, shakespeare: str
) -> None:
    """SentencePiece round-trips held-out Shakespeare and unseen non-ASCII text exactly."""
    assert sp_tokenizer.vocab_size == 1024
    held_out = shakespeare[-20_000:]
    ids = sp_tokenizer.encode(held_out)
    assert ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 1024
    assert len(ids) < 0.5 * len(held_out)  # Actually compresses.
    assert sp_tokenizer.decode(ids) == held_out
    assert sp_tokenizer.decode(sp_tokenizer.encode(NON_ASCII)) == NON_ASCII
    assert sp_tokenizer.decode(sp_tokenizer.encode(" leading space")) == " leading space"


def test_sentencepiece_model_type(sp_tokenizer: tokenization.SentencePieceTokenizer) -> None:
    """The trained model records its type."""
    assert sp_tokenizer.model_type in tokenization.SENTENCEPIECE_MODEL_TYPES


def test_sentencepiece_rejects_tiny_vocab() -> None:
    """A vocabulary too small for the byte-fallback pieces is rejected up front."""
    with pytest.raises(ValueError, match="too small"):
        tokenization.SentencePieceTokenizer.train("some text", vocab_size=265)


def _all_tokenizers(
    shakespeare: str, sp_tokenizer: tokenization.SentencePieceTokenizer
) -> list[tokenization.Tokenizer]:
    """Returns one tokenizer of each kind."""
    return [
        tokenization.CharTokenizer.from_text(shakespeare),
        tokenization.ByteTokenizer(),
        sp_tokenizer,
    ]


def test_save_load_round_trip(
    tmp_path: pathlib.Path, shakespeare: str, sp_tokenizer: tokenization.SentencePieceTokenizer
) -> None:
    """Every tokenizer restores from its directory with identical behaviour."""
    sample = shakespeare[:5000]
    for tok in _all_tokenizers(shakespeare, sp_tokenizer):
        directory = str(tmp_path / tok.kind)
        tok.save(directory)
        assert os.path.isfile(os.path.join(directory, "tokenizer.json"))
        assert os.path.isfile(os.path.join(directory, "tokenizer.model")) == (
            tok.kind == "sentencepiece"
        )
        restored = tokenization.load_tokenizer(directory)
        assert type(restored) is type(tok)
        assert restored.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(restored.encode(sample), tok.encode(sample))
        assert restored.decode(restored.encode(sample)) == sample


def test_load_tokenizer_missing(tmp_path: pathlib.Path) -> None:
    """Loading from a directory without tokenizer.json raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenization.load_tokenizer(str(tmp_path))


def test_build_tokenizer(tmp_path: pathlib.Path, shakespeare: str) -> None:
    """build_tokenizer dispatches on kind, and lists choices for unknown kinds; what it builds
    saves and loads back."""
    text = shakespeare[:100_000]
    assert isinstance(tokenization.build_tokenizer("char", text), tokenization.CharTokenizer)
    assert tokenization.build_tokenizer("byte", text).vocab_size == 256
    sp = tokenization.build_tokenizer("sentencepiece", text, vocab_size=400)
    assert sp.vocab_size == 400 and sp.unit == "token"
    sp.save(str(tmp_path))
    assert tokenization.load_tokenizer(str(tmp_path)).vocab_size == 400
    with pytest.raises(ValueError, match="char, byte, sentencepiece"):
        tokenization.build_tokenizer("wordpiece", text)


def test_every_tokenizer_refuses_a_lone_surrogate_the_same_way(
    shakespeare: str, sp_tokenizer: tokenization.SentencePieceTokenizer
) -> None:
    """ "ab\\ud83d" is a valid JSON string but not Unicode text: every kind raises the same
    ValueError (which the server answers with a 400), none a TypeError from its library."""
    bpe = tokenization.BPETokenizer.train(iter([shakespeare[:50_000]]), 300)
    kinds = [tokenization.CharTokenizer.from_text("ab"), tokenization.ByteTokenizer(),
             sp_tokenizer, bpe]  # fmt: skip
    for tokenizer in kinds:
        with pytest.raises(ValueError, match="lone surrogate U\\+D83D at character 2"):
            tokenizer.encode("ab\ud83d")
    with pytest.raises(ValueError, match="lone surrogate"):
        bpe.encode_batch(["fine", "\udfff"])
    assert bpe.encode("ab\U0001f600").size  # a pair, as one character, is text
