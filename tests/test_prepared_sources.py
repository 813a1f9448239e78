"""Prepared tokens are their sources, exactly: a directory is never reused for another source
or tokenizer, a changed or grown source is prepared again (or refused, naming what differs),
text that spells a special token is ordinary text, and a document's tokens do not depend on how
preparation cut its file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data import manifest, prepare, sources, text_windows, tokenization

SPECIAL = tokenization.END_OF_TEXT
# Text whose tokens a careless cut would change: runs of newlines and of spaces, lines that
# start with spaces, tabs or a Unicode space, words glued to newlines, multi-byte characters.
AWKWARD = "".join(
    f"Line {i}: the  cat\n\n\n   sat on\tthe mat \u3000wide\n\u00e9t\u00e9 {i}\n \n"
    for i in range(300)
)


def _tokens(out: str) -> np.ndarray:
    record = prepare.read_manifest(out)
    stream = text_windows.TokenStream(out, record)
    return stream.windows(np.asarray([0]), stream.size)[0]


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> str:
    """A small byte-level BPE with <|endoftext|>, saved as a Hugging Face tokenizer.json."""
    text = sources.load_text_corpus("tiny_shakespeare")[:200_000]
    tok = tokenization.BPETokenizer.train(iter([text]), 400)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save_hugging_face_files(str(path.parent))
    return str(path)


def test_another_source_or_tokenizer_into_the_same_out_is_refused(tmp_path):
    """--out holds a.txt as chars: b.txt as bytes into it is refused naming both differences,
    and the tokens there stay a.txt's."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha " * 500)
    b.write_text("beta " * 500)
    out = str(tmp_path / "out")
    first = prepare.prepare(str(a), "char", out, progress=False)
    with pytest.raises(manifest.PrepareError, match="source: .*a.txt.* there, .*b.txt.* now") as e:
        prepare.prepare(str(b), "byte", out, progress=False)
    assert "tokenizer: 'char' there, 'byte' now" in str(e.value)
    with pytest.raises(manifest.PrepareError, match="vocab_size: None there, 99 now"):
        prepare.prepare(str(a), "char", out, vocab_size=99, progress=False)
    assert prepare.read_manifest(out) == first
    assert tokenization.load_tokenizer(out).decode(_tokens(out)) == "alpha " * 500
    assert prepare.prepare(str(a), "char", out, progress=False) == first  # the same: reused


def test_a_file_added_to_a_directory_source_is_prepared(tmp_path, monkeypatch):
    """`--config.dataset=<dir>` prepared on first use: a file added later reaches the tokens
    (the old tokens are moved aside, not reused)."""
    monkeypatch.setenv("JAXLAB_TOKENS_DIR", str(tmp_path / "tokens"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text("first document " * 100)
    out = prepare.prepared_cache(str(corpus), "byte")
    before = prepare.read_manifest(out)["num_tokens"]
    (corpus / "two.txt").write_text("second document " * 100)
    again = prepare.prepared_cache(str(corpus), "byte")
    assert again == out
    text = tokenization.load_tokenizer(out).decode(_tokens(out))
    assert "second document" in text and prepare.read_manifest(out)["num_tokens"] > before
    assert any(
        n.startswith(os.path.basename(out) + ".replaced-") for n in os.listdir(tmp_path / "tokens")
    )


def test_a_source_edited_between_slices_is_refused(tmp_path):
    """Slice 0 of 2 done, then the file changes: slice 1 is refused, naming the file, and no
    manifest mixes the two versions."""
    source = tmp_path / "corpus.txt"
    source.write_text("".join(f"line {i} of the first version\n" for i in range(4000)))
    out = str(tmp_path / "out")
    assert prepare.prepare(str(source), "char", out, num_shards=2, shard_index=0,
                           unit_bytes=20_000, progress=False) is None  # fmt: skip
    source.write_text("".join(f"line {i} of the second version\n" for i in range(4000)))
    with pytest.raises(manifest.PrepareError, match="corpus.txt: changed"):
        prepare.prepare(str(source), "char", out, num_shards=2, shard_index=1,
                        unit_bytes=20_000, progress=False)  # fmt: skip
    assert not os.path.exists(os.path.join(out, manifest.MANIFEST))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece", "tokenizer.json"])
def test_special_token_text_is_ordinary_text(kind, tmp_path, bpe_json):
    """A one-document corpus that spells <|endoftext|> 20 times gets one separator (the one
    preparation inserts), and encode() of such text, as a prompt's, holds no separator id."""
    source = tmp_path / "doc.txt"
    source.write_text(("some words " * 20 + SPECIAL) * 20 + " the end.")
    argument = bpe_json if kind == "tokenizer.json" else kind
    out = str(tmp_path / "out")
    prepare.prepare(str(source), argument, out, vocab_size=300, progress=False)
    tokenizer = tokenization.load_tokenizer(out)
    ids = _tokens(out)
    eot = tokenizer.eot_id
    if eot is not None:
        assert int((ids == eot).sum()) == 1 and ids[-1] == eot
        assert eot not in tokenizer.encode(f"a{SPECIAL}b</s>").tolist()
    text = tokenizer.decode(ids[:-1] if eot is not None else ids)
    if kind != "sentencepiece":  # SentencePiece normalises whitespace; the rest round-trip
        assert text == source.read_text()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece", "tokenizer.json"])
def test_a_documents_tokens_do_not_depend_on_the_cut(kind, tmp_path, bpe_json):
    """The same file prepared whole and cut into many small units gives the same tokens (and
    one separator at its end, not one a unit)."""
    source = tmp_path / "doc.txt"
    source.write_text(AWKWARD)
    argument = bpe_json if kind == "tokenizer.json" else kind
    whole = str(tmp_path / "whole")
    cut = str(tmp_path / "cut")
    prepare.prepare(str(source), argument, whole, vocab_size=300, progress=False)
    prepare.prepare(str(source), argument, cut, vocab_size=300, unit_bytes=997, progress=False)
    assert len(prepare.read_manifest(cut)["shards"]) > 10
    if kind in ("char", "bpe", "sentencepiece"):  # trained on the corpus: the same model?
        assert tokenization.load_tokenizer(whole) == tokenization.load_tokenizer(cut)
    np.testing.assert_array_equal(_tokens(cut), _tokens(whole))


def test_json_lines_are_split_on_newline_alone(tmp_path):
    """JSON Lines written with ensure_ascii=False may hold U+2028, U+2029 and U+0085 inside
    their strings: valid JSON, kept as text, not taken for line breaks."""
    documents = [f"doc {i}: a\u2028b\u0085c\u2029d" for i in range(50)]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in documents))
    out = str(tmp_path / "out")
    prepare.prepare(str(source), "byte", out, progress=False)
    assert tokenization.load_tokenizer(out).decode(_tokens(out)) == "".join(documents)
