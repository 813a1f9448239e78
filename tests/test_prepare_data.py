"""Tokenize once, read windows from the shards: round trips, resumable and sliced
preparation, exact and process-sliced batches, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data import prepare, sources, text_windows, tokenization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shakespeare_files(tmp_path_factory) -> str:
    """Tiny Shakespeare cut into 4 files (a glob source of several documents)."""
    with open(sources.tiny_shakespeare_file()) as f:
        text = f.read()
    directory = tmp_path_factory.mktemp("corpus")
    quarter = len(text) // 4
    for i in range(4):
        (directory / f"part{i}.txt").write_text(text[i * quarter : (i + 1) * quarter])
    return str(directory)


def _tokens(out: str) -> np.ndarray:
    manifest = prepare.read_manifest(out)
    stream = text_windows.TokenStream(out, manifest)
    return stream.windows(np.asarray([0]), stream.size)[0]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_round_trip_through_shards(kind, shakespeare_files, tmp_path):
    """decode(the shards) == the documents, each followed by the end-of-text token where the
    vocabulary has one (BPE trained here has <|endoftext|>; bytes have none): one separator a
    document, however many units preparation cut a file into."""
    out = str(tmp_path / kind)
    manifest = prepare.prepare(f"{shakespeare_files}/*.txt", kind, out, vocab_size=600,
                                    unit_bytes=100_000, progress=False)  # fmt: skip
    tokenizer = tokenization.load_tokenizer(out)
    files = sorted(os.listdir(shakespeare_files))
    documents = []
    for name in files:
        with open(os.path.join(shakespeare_files, name)) as f:
            documents.append(f.read())
    text = tokenizer.decode(_tokens(out))
    if kind == "bpe":
        assert manifest["document_separator"] == tokenizer.eot_id is not None
        assert text.split(tokenization.END_OF_TEXT) == documents + [""]
        text = text.replace(tokenization.END_OF_TEXT, "")
    assert text == "".join(documents)
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 4  # files were cut
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train == [0, int(manifest["num_tokens"] * 0.9)] and val == [
        train[1],
        manifest["num_tokens"],
    ]


def test_an_interrupted_prepare_resumes_to_the_same_shards(shakespeare_files, tmp_path):
    """One slice of two done, then a shard cut off mid-write (its sidecar missing, a stale
    temporary file): the rerun redoes only what is missing and ends with the shards of an
    uninterrupted run. Array slices write the manifest when the last one finishes."""
    source = f"{shakespeare_files}/*.txt"
    whole = prepare.prepare(source, "char", str(tmp_path / "whole"), unit_bytes=100_000,
                                 progress=False)  # fmt: skip
    out = str(tmp_path / "sliced")
    assert prepare.prepare(source, "char", out, num_shards=2, shard_index=0,
                                unit_bytes=100_000, progress=False) is None  # fmt: skip
    os.remove(os.path.join(out, "shards", "00002.json"))  # cut off before it completed
    with open(os.path.join(out, "shards", "00002.bin.tmp123"), "wb") as f:
        f.write(b"partial")
    assert prepare.prepare(source, "char", out, num_shards=2, shard_index=1,
                                unit_bytes=100_000, progress=False) is None  # fmt: skip
    resumed = prepare.prepare(source, "char", out, unit_bytes=100_000, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]


def test_the_command_line_prepares_a_jsonl_source(tmp_path):
    """`python -m data.prepare` as a command: JSONL documents with a text field."""
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"body": f"document number {i}. " * 20})
                                for i in range(200)))  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "data.prepare", f"--source={source}",
                             "--tokenizer=byte", f"--out={out}", "--text_field=body"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens (uint16) in 1 shards, byte tokenizer of 256" in result.stdout
    assert prepare.read_manifest(str(out))["num_tokens"] > 200 * 20 * 10


def _splits(tmp_path, block_size: int = 32) -> text_windows.TextSplits:
    out = str(tmp_path / "ts")
    shutil.copytree(os.path.join(sources.default_tokens_dir(), "tiny_shakespeare-char"), out)
    return text_windows.TextSplits(out, block_size)


def test_resumed_training_sees_the_same_batches(tmp_path):
    """Batches are a pure function of the step: starting at step 7 (in stacks of 4, as a run
    resumed with steps_per_dispatch=4) gives exactly the batches of steps 7.. of a run from 0."""
    splits = _splits(tmp_path)
    full = list(splits.train_batches(seed=3, global_batch=8, stop_step=16))
    resumed = list(splits.train_batches(seed=3, global_batch=8, start_step=7,
                                        steps_per_dispatch=4, stop_step=16))  # fmt: skip
    assert [len(b["inputs"]) for b in resumed] == [1, 4, 4]  # steps 7 | 8-11 | 12-15
    flat = np.concatenate([b["inputs"] for b in resumed])
    np.testing.assert_array_equal(flat, np.stack([b["inputs"] for b in full[7:]]))
    first = full[0]
    np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])


def test_processes_slices_together_equal_one_batch(tmp_path, monkeypatch):
    """Two processes' slices of step 5, concatenated, are the one-process batch of step 5."""
    splits = _splits(tmp_path)
    whole = splits.batch("train", 0, 5, 8)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(splits.batch("train", 0, 5, 8)["inputs"])
    np.testing.assert_array_equal(np.concatenate(parts), whole["inputs"])


def test_a_vocabulary_past_uint16_is_stored_as_uint32(tmp_path):
    """70,000 distinct characters: ids up to 69,999 do not fit uint16; the shards are uint32
    and decode back to the text."""
    text = "".join(chr(0x10000 + i) for i in range(70_000))
    (tmp_path / "wide.txt").write_text(text)
    out = str(tmp_path / "out")
    manifest = prepare.prepare(str(tmp_path / "wide.txt"), "char", out, progress=False)
    assert manifest["dtype"] == "uint32"
    assert tokenization.load_tokenizer(out).decode(_tokens(out)) == text


def test_a_file_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 10 + b"caf\xe9\n")
    with pytest.raises(prepare.PrepareError, match=r"bad.txt is not UTF-8 text: byte 103"):
        prepare.prepare(str(tmp_path / "bad.txt"), "byte", str(tmp_path / "out"),
                             progress=False)  # fmt: skip


def test_a_corpus_too_short_for_one_window_says_so_with_the_numbers(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 50)
    out = str(tmp_path / "out")
    prepare.prepare(str(tmp_path / "short.txt"), "byte", out, progress=False)
    with pytest.raises(
        sources.DatasetUnavailableError, match="has 45 tokens, too few for one window of 65"
    ):
        text_windows.TextSplits(out, 64)


def test_an_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(prepare.PrepareError, match="empty"):
        prepare.prepare(str(tmp_path / "empty.txt"), "char", str(tmp_path / "out"),
                             progress=False)  # fmt: skip


def test_a_damaged_or_missing_shard_is_named(tmp_path):
    """Flipped bytes (checksum), a cut-off shard (size) and a missing one: each names the file."""
    splits = _splits(tmp_path)
    shard = os.path.join(splits.directory, "shards", "00000.bin")
    with open(shard, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff")
    with pytest.raises(
        sources.DatasetUnavailableError, match="00000.bin does not match its checksum"
    ):
        text_windows.TextSplits(splits.directory, 32)
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(sources.DatasetUnavailableError, match="00000.bin is 100 bytes, expected"):
        text_windows.TextSplits(splits.directory, 32)
    os.remove(shard)
    with pytest.raises(sources.DatasetUnavailableError, match="00000.bin is missing"):
        text_windows.TextSplits(splits.directory, 32)


def test_a_prepared_directory_must_match_the_config(tiny_lm_config):
    """A prepared directory read with another tokenizer in the config is refused, naming both."""
    import config_validation
    import input_pipeline

    tiny_lm_config.dataset = os.path.join(sources.default_tokens_dir(), "tiny_shakespeare-char")
    tiny_lm_config.tokenizer = "byte"
    with pytest.raises(
        config_validation.ConfigError, match="config.tokenizer='byte' \\(the data's is 'char'\\)"
    ):
        input_pipeline.prepared_dir(tiny_lm_config)


def test_language_model_training_imports_no_tensorflow(tmp_path, tiny_corpus):
    """A short GPT run on a text corpus with TensorFlow made unimportable (as on the lent GPU
    machine): the language-model path never needs it."""
    code = f"""
import sys
for name in ("tensorflow", "tensorflow_datasets"):  # as if not installed: import fails
    sys.modules[name] = None
sys.path.insert(0, {REPO!r}); sys.path.insert(1, {os.path.join(REPO, "tests")!r})
import conftest, train
config = conftest._tiny_lm_config({tiny_corpus!r})
final = train.train_and_evaluate(config, {str(tmp_path / "run")!r})
assert final["val_loss"] > 0 and sys.modules["tensorflow"] is None
print("OK", final["val_loss"])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_resuming_a_language_model_run_imports_no_tensorflow(tmp_path, tiny_corpus):
    """With TensorFlow installed, a resumed GPT run (which rewrites its TensorBoard event files
    past the checkpoint) still never imports it: no TensorFlow start-up cost or log noise."""
    code = f"""
import sys
sys.path.insert(0, {REPO!r}); sys.path.insert(1, {os.path.join(REPO, "tests")!r})
import conftest, train
config = conftest._tiny_lm_config({tiny_corpus!r})
config.num_train_steps = config.decay_steps = 4
train.train_and_evaluate(config, {str(tmp_path / "run")!r})
config.num_train_steps = config.decay_steps = 6  # a longer run of the same kind: resumes
final = train.train_and_evaluate(config, {str(tmp_path / "run")!r})
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("OK", final["val_loss"])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout and "Resum" in result.stdout, result.stdout[-2000:]
