"""Tests for data.sources: offline Fashion-MNIST, Tiny Shakespeare and text corpora."""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import prepare, sources  # noqa: E402

NANOGPT_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session")
def data_dir() -> str:
    """Prepares the datasets in default_data_dir() (a no-op after `make data`) and returns it."""
    path = sources.default_data_dir()
    sources.prepare_fashion_mnist(path)
    sources.prepare_tiny_shakespeare(path)
    return path


@pytest.fixture(scope="session")
def shakespeare(data_dir: str) -> str:
    """Returns the Tiny Shakespeare text, read through TFDS."""
    return sources.load_text_corpus("tiny_shakespeare", data_dir)


def test_default_dirs_follow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """JAXLAB_DATA_DIR / JAXLAB_SHARED_DIR override the defaults next to the repository."""
    monkeypatch.delenv("JAXLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("JAXLAB_SHARED_DIR", raising=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__)))
    assert sources.default_data_dir() == os.path.join(repo, ".data", "tensorflow_datasets")
    assert sources.shared_data_dir() == os.path.normpath(os.path.join(repo, "../shared/data"))
    monkeypatch.setenv("JAXLAB_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("JAXLAB_SHARED_DIR", str(tmp_path / "shared"))
    assert sources.default_data_dir() == str(tmp_path / "tfds")
    assert sources.shared_data_dir() == str(tmp_path / "shared")
    assert sources.default_bible_path() == str(tmp_path / "text" / "kjv.txt")


def test_dataset_versions_match_tfds(data_dir: str) -> None:
    """is_prepared() looks for the versions that the installed TFDS builders produce."""
    import tensorflow_datasets as tfds

    for name, version in sources.DATASET_VERSIONS.items():
        assert str(tfds.builder(name, data_dir=data_dir).version) == version
        assert sources.is_prepared(name, data_dir)


def test_tiny_shakespeare_is_the_original_text(shakespeare: str) -> None:
    """The text read through TFDS is karpathy's input.txt, byte for byte."""
    assert len(shakespeare) == sources.TINY_SHAKESPEARE_NUM_CHARS == 1_115_394
    digest = hashlib.sha256(shakespeare.encode("utf-8")).hexdigest()
    assert digest == sources.TINY_SHAKESPEARE_SHA256
    assert shakespeare.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


def test_tiny_shakespeare_vocabulary_matches_nanogpt(shakespeare: str) -> None:
    """The sorted character set is nanoGPT's 65-character shakespeare_char vocabulary."""
    assert "".join(sorted(set(shakespeare))) == NANOGPT_CHARS
    assert len(NANOGPT_CHARS) == 65


def test_tiny_shakespeare_splits_match_nanogpt(shakespeare: str, data_dir: str) -> None:
    """nanoGPT trains on the first 90% and validates on the rest; TFDS train is the same 90%."""
    import tensorflow_datasets as tfds

    n = len(shakespeare)
    train, val = shakespeare[: int(n * 0.9)], shakespeare[int(n * 0.9) :]
    assert (len(train), len(val)) == (1_003_854, 111_540)
    splits = {}
    for split in sources.TINY_SHAKESPEARE_SPLITS:
        ds = tfds.load("tiny_shakespeare", split=split, data_dir=data_dir, download=False)
        splits[split] = "".join(ex["text"].decode("utf-8") for ex in tfds.as_numpy(ds))
    assert splits["train"] == train
    assert splits["validation"] + splits["test"] == val


def test_tiny_shakespeare_falls_back_to_shared_file(
    tmp_path: pathlib.Path, shakespeare: str
) -> None:
    """Without a prepared TFDS copy the shared input.txt is read directly."""
    empty_data_dir = str(tmp_path / "tfds")
    assert not sources.is_prepared("tiny_shakespeare", empty_data_dir)
    assert sources.load_text_corpus("tiny_shakespeare", empty_data_dir) == shakespeare


def test_tiny_shakespeare_missing_or_corrupt(tmp_path: pathlib.Path) -> None:
    """A missing or altered input.txt gives DatasetUnavailableError saying what to do."""
    shared = tmp_path / "shared"
    with pytest.raises(sources.DatasetUnavailableError, match="input.txt") as info:
        sources.prepare_tiny_shakespeare(
            str(tmp_path / "tfds"), shared_dir=str(shared), allow_download=False
        )
    assert sources.TINY_SHAKESPEARE_URL in str(info.value)
    assert "make data" in str(info.value)
    (shared / "tinyshakespeare").mkdir(parents=True)
    (shared / "tinyshakespeare" / "input.txt").write_text("not shakespeare\n")
    with pytest.raises(sources.DatasetUnavailableError, match="sha256"):
        sources.prepare_tiny_shakespeare(str(tmp_path / "tfds"), shared_dir=str(shared))


def test_prepare_is_idempotent(data_dir: str) -> None:
    """Preparing again leaves the prepared datasets untouched."""
    infos = {
        name: os.path.join(data_dir, name, version, "dataset_info.json")
        for name, version in sources.DATASET_VERSIONS.items()
    }
    before = {name: os.stat(path).st_mtime_ns for name, path in infos.items()}
    sources.prepare_fashion_mnist(data_dir)
    sources.prepare_tiny_shakespeare(data_dir)
    assert {name: os.stat(path).st_mtime_ns for name, path in infos.items()} == before
    assert sources.split_sizes("fashion_mnist", data_dir) == {"train": 60000, "test": 10000}


def test_fashion_mnist_unavailable_message(tmp_path: pathlib.Path) -> None:
    """Without the Debian files and without downloading, the error says how to get the data."""
    with pytest.raises(sources.DatasetUnavailableError) as info:
        sources.prepare_fashion_mnist(
            str(tmp_path / "tfds"), source_dir=str(tmp_path / "nothing"), allow_download=False
        )
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "make data" in message
    assert "network" in message
    assert isinstance(info.value, RuntimeError)


def test_command_reports_ready(data_dir: str) -> None:
    """`python -m data --data_dir=...` on prepared data exits 0 with one ready line per
    dataset, and a positional argument is refused."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__)))
    command = [sys.executable, "-m", "data"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [*command, f"--data_dir={data_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fashion_mnist: ready (60000 train / 10000 test)" in result.stdout
    assert "tiny_shakespeare: ready (1115394 chars: 1003854 train / 55770 validation / " in (
        result.stdout
    )
    result = subprocess.run(
        [*command, data_dir], capture_output=True, text=True, timeout=300, cwd=repo, env=env
    )
    assert result.returncode != 0 and "Unexpected arguments" in result.stderr


def test_command_exit_status_when_a_dataset_is_unavailable(
    data_dir: str, tmp_path: pathlib.Path
) -> None:
    """`python -m data` exits 1 and prints the how-to when Tiny Shakespeare cannot be
    prepared (here: a corrupt shared input.txt; Fashion-MNIST is linked in, already prepared)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__)))
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    (tfds_dir / "fashion_mnist").symlink_to(os.path.join(data_dir, "fashion_mnist"))
    shared = tmp_path / "shared"
    (shared / "tinyshakespeare").mkdir(parents=True)
    (shared / "tinyshakespeare" / "input.txt").write_text("not shakespeare\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAXLAB_SHARED_DIR": str(shared)}
    result = subprocess.run(
        [sys.executable, "-m", "data", f"--data_dir={tfds_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=env,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "fashion_mnist: ready (60000 train / 10000 test)" in result.stdout
    assert "tiny_shakespeare: UNAVAILABLE" in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_all_reports_ready(data_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """prepare_all (the command's work) on prepared data returns 0 with one line per dataset."""
    assert prepare.prepare_all(data_dir) == 0
    out = capsys.readouterr().out
    assert "fashion_mnist: ready (60000 train / 10000 test)" in out
    assert "tiny_shakespeare: ready (1115394 chars" in out


def test_prepare_all_fails_without_fashion_mnist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without Fashion-MNIST (no Debian files, no network) the command's prepare_all returns 1
    (its exit status) with the how-to."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "nothing"))
    monkeypatch.setattr(sources, "_unreachable_reason", lambda url: "offline (test)")
    monkeypatch.setattr(sources, "prepare_tiny_shakespeare", lambda data_dir: None)
    monkeypatch.setattr(sources, "BIBLE_COMMAND", "no-such-bible-command")
    assert prepare.prepare_all(str(tmp_path / "tfds")) == 1
    err = capsys.readouterr().err
    assert "sudo apt-get install dataset-fashion-mnist" in err
    assert "offline (test)" in err


def test_fashion_mnist_loads(data_dir: str) -> None:
    """TFDS fashion_mnist has 60000/10000 28x28x1 uint8 images with labels 0..9."""
    import tensorflow_datasets as tfds

    expected = {"train": 60000, "test": 10000}
    for split, count in expected.items():
        ds = tfds.load("fashion_mnist", split=split, data_dir=data_dir, batch_size=-1)
        data = tfds.as_numpy(ds)
        images, labels = data["image"], data["label"]
        assert images.shape == (count, 28, 28, 1)
        assert images.dtype == np.uint8
        assert labels.shape == (count,)
        assert labels.min() == 0 and labels.max() == 9
        assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10


@pytest.mark.skipif(
    not os.path.isfile(
        os.path.join(sources.DEBIAN_FASHION_MNIST_DIR, sources.FASHION_MNIST_FILES[2])
    ),
    reason="Debian dataset-fashion-mnist not installed",
)
def test_fashion_mnist_matches_debian_files(data_dir: str) -> None:
    """The TFDS test split holds the same (label, image) pairs as the Debian IDX files."""
    import tensorflow_datasets as tfds

    source = sources.DEBIAN_FASHION_MNIST_DIR
    with gzip.open(os.path.join(source, "t10k-images-idx3-ubyte.gz")) as f:
        raw_images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(os.path.join(source, "t10k-labels-idx1-ubyte.gz")) as f:
        raw_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    data = tfds.as_numpy(tfds.load("fashion_mnist", split="test", data_dir=data_dir, batch_size=-1))
    images = data["image"].reshape(-1, 784)

    def keys(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
        """Returns the sorted byte strings label+image (order-independent comparison)."""
        return sorted(bytes([int(y)]) + x.tobytes() for x, y in zip(images, labels, strict=True))

    assert keys(images, data["label"]) == keys(raw_images, raw_labels)


def test_text_file_corpus(tmp_path: pathlib.Path) -> None:
    """Any other string is a path to a UTF-8 text file, read exactly."""
    text = "Ünïcode line\r\nsecond line\n\tend 🙂"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    assert sources.load_text_corpus(str(path)) == text


def test_missing_corpus_path(tmp_path: pathlib.Path) -> None:
    """A path that does not exist gives DatasetUnavailableError naming it and the known corpora."""
    missing = str(tmp_path / "no_such_corpus.txt")
    with pytest.raises(sources.DatasetUnavailableError) as info:
        sources.load_text_corpus(missing)
    message = str(info.value)
    assert missing in message
    assert "tiny_shakespeare" in message and "kjv" in message


def test_empty_corpus_file(tmp_path: pathlib.Path) -> None:
    """An empty text file is rejected."""
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        sources.load_text_corpus(str(path))


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv-text not installed")
def test_kjv_corpus(tmp_path: pathlib.Path) -> None:
    """'kjv' and 'bible' generate the King James Bible text at <data_dir>/../text/kjv.txt."""
    data_dir = str(tmp_path / "tensorflow_datasets")
    text = sources.load_text_corpus("kjv", data_dir)
    assert os.path.isfile(tmp_path / "text" / "kjv.txt")
    assert len(text) == 4_404_412
    assert text.startswith("Ge1:1 In the beginning God created the heaven and the earth.\n")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sources.load_text_corpus("bible", data_dir) == text


def test_bible_command_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Without the `bible` command the error names the Debian package."""
    monkeypatch.setattr(sources, "BIBLE_COMMAND", "no-such-bible-command")
    with pytest.raises(sources.DatasetUnavailableError, match="bible-kjv-text"):
        sources.write_bible_text(str(tmp_path / "kjv.txt"))
