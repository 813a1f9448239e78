"""Offline preparation and loading of jaxlab's datasets: Fashion-MNIST, Tiny Shakespeare, KJV."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from runtime import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Debian package `dataset-fashion-mnist` installs the original IDX files here (re-gzipped, so the
# bytes differ from the upstream downloads that TFDS has registered checksums for).
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_NUM_CHARS = 1_115_394
TINY_SHAKESPEARE_SPLITS = ("train", "validation", "test")

# TFDS versions that `is_prepared` looks for (a test checks them against the installed TFDS).
DATASET_VERSIONS = {"fashion_mnist": "3.0.1", "tiny_shakespeare": "1.0.0"}

BIBLE_COMMAND = "bible"
BIBLE_PACKAGE = "bible-kjv-text"
BIBLE_VERSE_RANGE = "Gen1:1-Rev22:21"

TEXT_CORPUS_NAMES = ("tiny_shakespeare", "kjv", "bible")

_FASHION_MNIST_HOWTO = (
    "Fashion-MNIST is not available. Either install the offline copy and prepare it:\n"
    "    sudo apt-get install dataset-fashion-mnist\n"
    "    make data\n"
    "or run `make data` (i.e. `.venv/bin/python -m data`) on a machine with network "
    "access, so that TensorFlow Datasets can download it."
)


class DatasetUnavailableError(cli.UserError, RuntimeError):
    """Raised when a dataset is neither prepared nor obtainable; the message says how to get it."""


def default_data_dir() -> str:
    """Returns the TFDS data directory: $JAXLAB_DATA_DIR, else <repo>/.data/tensorflow_datasets."""
    return os.environ.get("JAXLAB_DATA_DIR") or os.path.join(
        REPO_ROOT, ".data", "tensorflow_datasets"
    )


def shared_data_dir() -> str:
    """Returns the read-only shared data dir: $JAXLAB_SHARED_DIR, else <repo>/../shared/data."""
    return os.environ.get("JAXLAB_SHARED_DIR") or os.path.normpath(
        os.path.join(REPO_ROOT, "..", "shared", "data")
    )


def tiny_shakespeare_source_path(shared_dir: str | None = None) -> str:
    """Returns the path of the shared Tiny Shakespeare input.txt."""
    return os.path.join(shared_dir or shared_data_dir(), "tinyshakespeare", "input.txt")


def default_bible_path(data_dir: str | None = None) -> str:
    """Returns where the KJV text is written by default: <data_dir>/../text/kjv.txt."""
    data_dir = os.path.abspath(data_dir or default_data_dir())
    return os.path.join(os.path.dirname(data_dir), "text", "kjv.txt")


def _variant_dir(name: str, data_dir: str) -> str:
    """Returns the TFDS directory <data_dir>/<name>/<version> of a known dataset."""
    if name not in DATASET_VERSIONS:
        raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASET_VERSIONS)}.")
    return os.path.join(data_dir, name, DATASET_VERSIONS[name])


def is_prepared(name: str, data_dir: str | None = None) -> bool:
    """Returns whether TFDS dataset `name` is prepared in data_dir (checked without TF)."""
    variant_dir = _variant_dir(name, data_dir or default_data_dir())
    return all(
        os.path.isfile(os.path.join(variant_dir, f)) for f in ("dataset_info.json", "features.json")
    )


def split_sizes(name: str, data_dir: str | None = None) -> dict[str, int]:
    """Returns {split: number of examples} of a prepared TFDS dataset, read from its JSON info."""
    info_path = os.path.join(
        _variant_dir(name, data_dir or default_data_dir()), "dataset_info.json"
    )
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    return {
        split["name"]: sum(int(n) for n in split.get("shardLengths", []))
        for split in info.get("splits", [])
    }


def _unreachable_reason(url: str, timeout: float = 5.0) -> str | None:
    """Returns why url's host cannot be reached (None if it can, or if a proxy is configured)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None  # Let the proxy decide; TFDS's downloader honours it.
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {parts.hostname}:{port} ({e}); no network?"
    return None


def _sha256_file(path: str) -> str:
    """Returns the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(data_dir: str, name: str) -> Iterator[None]:
    """Holds an exclusive lock on <data_dir>/.<name>.lock (serialises concurrent preparation)."""
    os.makedirs(data_dir, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Not POSIX: no locking.
        yield
        return
    with open(os.path.join(data_dir, f".{name}.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def import_tfds() -> Any:
    """Imports tensorflow_datasets with TF's C++ info logs silenced (unless configured)."""
    cli.quiet_tensorflow()
    import tensorflow_datasets as tfds

    return tfds


def _local_fashion_mnist_builder(source_dir: str, data_dir: str) -> Any:
    """Returns a TFDS fashion_mnist builder that takes its four files from source_dir."""
    import_tfds()
    from tensorflow_datasets.core import utils as tfds_utils
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.image_classification import mnist

    # Checksums of the local files under the upstream URLs, so the manual-dir copies validate.
    url_infos = {
        mnist.FashionMNIST.URL + filename: checksums.compute_url_info(
            os.path.join(source_dir, filename)
        )
        for filename in FASHION_MNIST_FILES
    }

    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
        """TFDS fashion_mnist whose expected checksums are those of local copies of the files."""

        name = "fashion_mnist"

        @tfds_utils.classproperty
        @classmethod
        def url_infos(cls) -> dict[str, Any]:
            """Returns the checksums computed from the local files."""
            return url_infos

    # Record the upstream module in dataset_info.json (set after registration bookkeeping).
    LocalFashionMNIST.__module__ = mnist.FashionMNIST.__module__
    return LocalFashionMNIST(data_dir=data_dir)


def prepare_fashion_mnist(
    data_dir: str | None = None,
    source_dir: str | None = None,
    allow_download: bool = True,
) -> None:
    """Prepares TFDS fashion_mnist in data_dir from the Debian files, else by a TFDS download."""
    data_dir = data_dir or default_data_dir()
    source_dir = source_dir or DEBIAN_FASHION_MNIST_DIR
    if is_prepared("fashion_mnist", data_dir):
        return
    with _file_lock(data_dir, "fashion_mnist"):
        if is_prepared("fashion_mnist", data_dir):  # Prepared by a concurrent process.
            return
        have_local = all(os.path.isfile(os.path.join(source_dir, f)) for f in FASHION_MNIST_FILES)
        errors = []
        if have_local:
            tfds = import_tfds()
            builder = _local_fashion_mnist_builder(source_dir, data_dir)
            with tempfile.TemporaryDirectory(prefix="fashion_mnist_extract_") as extract_dir:
                try:
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(
                            manual_dir=source_dir,
                            extract_dir=extract_dir,
                            try_download_gcs=False,
                        )
                    )
                    return
                except Exception as e:  # Reported below, with the how-to.
                    errors.append(f"from {source_dir}: {type(e).__name__}: {e}")
        else:
            errors.append(f"{source_dir} does not hold {', '.join(FASHION_MNIST_FILES)}")
        if allow_download:
            tfds = import_tfds()
            url = tfds.image_classification.FashionMNIST.URL
            # Offline, TFDS's download retries take minutes to give up: probe the host first.
            if reason := _unreachable_reason(url):
                errors.append(f"TFDS download: {reason}")
            else:
                try:
                    tfds.builder("fashion_mnist", data_dir=data_dir).download_and_prepare(
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                    )
                    return
                except Exception as e:  # Typically no network; reported below.
                    errors.append(f"TFDS download: {type(e).__name__}: {e}")
        else:
            errors.append("TFDS download: not attempted (allow_download=False)")
        details = "\n".join(f"  - {e}" for e in errors)
        raise DatasetUnavailableError(f"{_FASHION_MNIST_HOWTO}\nAttempts:\n{details}")


def _tiny_shakespeare_howto(source: str) -> str:
    """Returns the instructions for obtaining Tiny Shakespeare."""
    return (
        f"Tiny Shakespeare is not available. Put the original input.txt "
        f"({TINY_SHAKESPEARE_NUM_CHARS} chars, sha256 {TINY_SHAKESPEARE_SHA256}) at\n"
        f"    {source}\n"
        f"(or set JAXLAB_SHARED_DIR to a directory holding tinyshakespeare/input.txt), e.g.\n"
        f"    curl -L -o {source} {TINY_SHAKESPEARE_URL}\n"
        f"then run `make data`; or run `make data` with network access so TFDS downloads it."
    )


def _check_tiny_shakespeare_file(path: str) -> None:
    """Raises DatasetUnavailableError unless path is the original Tiny Shakespeare input.txt."""
    digest = _sha256_file(path)
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DatasetUnavailableError(
            f"{path} is not the original Tiny Shakespeare input.txt: sha256 {digest}, expected "
            f"{TINY_SHAKESPEARE_SHA256}. Replace it with a fresh copy of {TINY_SHAKESPEARE_URL}."
        )


def prepare_tiny_shakespeare(
    data_dir: str | None = None,
    shared_dir: str | None = None,
    allow_download: bool = True,
) -> None:
    """Prepares TFDS tiny_shakespeare in data_dir from the shared input.txt, else by download."""
    data_dir = data_dir or default_data_dir()
    if is_prepared("tiny_shakespeare", data_dir):
        return
    source = tiny_shakespeare_source_path(shared_dir)
    have_local = os.path.isfile(source)
    if have_local:
        _check_tiny_shakespeare_file(source)
    elif not allow_download:
        raise DatasetUnavailableError(_tiny_shakespeare_howto(source))
    elif reason := _unreachable_reason(TINY_SHAKESPEARE_URL):
        raise DatasetUnavailableError(
            f"{_tiny_shakespeare_howto(source)}\nDownloading is impossible: {reason}"
        )
    with _file_lock(data_dir, "tiny_shakespeare"):
        if is_prepared("tiny_shakespeare", data_dir):
            return
        tfds = import_tfds()
        builder = tfds.builder("tiny_shakespeare", data_dir=data_dir)
        try:
            if have_local:
                # TFDS's registered checksum matches the original file, so no override is needed.
                config = tfds.download.DownloadConfig(
                    manual_dir=os.path.dirname(source), try_download_gcs=False
                )
                builder.download_and_prepare(download_config=config)
            else:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
        except Exception as e:  # Reported with the how-to.
            raise DatasetUnavailableError(
                f"{_tiny_shakespeare_howto(source)}\nPreparing failed: {type(e).__name__}: {e}"
            ) from e


def write_bible_text(path: str | None = None) -> str:
    """Writes the King James Bible (`bible` command) as plain text to path; returns the path."""
    path = path or default_bible_path()
    command = shutil.which(BIBLE_COMMAND)
    if command is None:
        raise DatasetUnavailableError(
            f"The `{BIBLE_COMMAND}` command is missing, so the King James Bible text cannot be "
            f"generated. Install it with\n    sudo apt-get install {BIBLE_PACKAGE}\n"
            f"then run `make data`, or pass a path to any UTF-8 text file instead."
        )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # Never wrap lines.
    result = subprocess.run(
        [command, "-f", BIBLE_VERSE_RANGE], capture_output=True, check=False, env=env
    )
    if result.returncode != 0 or not result.stdout:
        raise DatasetUnavailableError(
            f"`{BIBLE_COMMAND} -f {BIBLE_VERSE_RANGE}` failed (exit {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}. Reinstall with\n"
            f"    sudo apt-get install --reinstall {BIBLE_PACKAGE}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Write atomically so that concurrent readers never see a partial file.
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".kjv_", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(result.stdout)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    return path


def _read_text_file(path: str) -> str:
    """Reads a UTF-8 text file exactly (no newline translation)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _tiny_shakespeare_from_tfds(data_dir: str) -> str:
    """Returns the concatenated train+validation+test text of the prepared TFDS dataset."""
    tfds = import_tfds()
    parts = []
    for split in TINY_SHAKESPEARE_SPLITS:
        ds = tfds.load("tiny_shakespeare", split=split, data_dir=data_dir, download=False)
        parts.extend(example["text"].decode("utf-8") for example in tfds.as_numpy(ds))
    return "".join(parts)


def load_tiny_shakespeare(data_dir: str | None = None, shared_dir: str | None = None) -> str:
    """Returns the full original Tiny Shakespeare text (sha256-checked): the shared input.txt
    where it is (no TensorFlow needed: the language-model path runs without it), else the
    prepared TFDS dataset's splits concatenated. DatasetUnavailableError if neither is here."""
    data_dir = data_dir or default_data_dir()
    source = tiny_shakespeare_source_path(shared_dir)
    if os.path.isfile(source):
        _check_tiny_shakespeare_file(source)
        return _read_text_file(source)
    if is_prepared("tiny_shakespeare", data_dir):
        text = _tiny_shakespeare_from_tfds(data_dir)
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != TINY_SHAKESPEARE_SHA256:
            raise RuntimeError(
                f"The TFDS tiny_shakespeare splits in {data_dir} are not the original text; "
                f"delete {os.path.join(data_dir, 'tiny_shakespeare')} and run `make data` again."
            )
        return text
    raise DatasetUnavailableError(_tiny_shakespeare_howto(source))


def tiny_shakespeare_file(data_dir: str | None = None, shared_dir: str | None = None) -> str:
    """The path of the original Tiny Shakespeare text (checked by sha256): the shared input.txt,
    else a copy written once from the prepared TFDS dataset into <data_dir>/../text/."""
    source = tiny_shakespeare_source_path(shared_dir)
    if os.path.isfile(source):
        _check_tiny_shakespeare_file(source)
        return source
    path = os.path.join(os.path.dirname(default_bible_path(data_dir)), "tiny_shakespeare.txt")
    if not os.path.isfile(path):
        text = load_tiny_shakespeare(data_dir, shared_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def tfds_text_file(name: str, data_dir: str | None = None, field: str = "text") -> str:
    """A TFDS text dataset's `field`, every split, as one UTF-8 file (one document a line of
    JSONL) written once into <data_dir>/../text/<name>.jsonl; needs TensorFlow."""
    path = os.path.join(os.path.dirname(default_bible_path(data_dir)), f"{name}.jsonl")
    if os.path.isfile(path):
        return path
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir or default_data_dir())
        builder.download_and_prepare()
    except Exception as e:
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not prepared and could not be downloaded ({e})."
        ) from e
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for split in builder.info.splits:
            for example in tfds.as_numpy(builder.as_dataset(split=split)):
                text = example[field]
                f.write(json.dumps({"text": text.decode("utf-8")}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def default_tokens_dir(data_dir: str | None = None) -> str:
    """Where prepared token shards live: $JAXLAB_TOKENS_DIR, else <data_dir>/../tokens."""
    if os.environ.get("JAXLAB_TOKENS_DIR"):
        return os.environ["JAXLAB_TOKENS_DIR"]
    return os.path.join(os.path.dirname(os.path.abspath(data_dir or default_data_dir())), "tokens")


def corpus_file(source: str, data_dir: str | None = None) -> str | None:
    """The text file a known corpus name stands for ('tiny_shakespeare', 'kjv' or 'bible',
    'tfds:NAME'), written once where it is not yet on disk; None when `source` is not a corpus
    name (then it is a path, a glob or a directory). The one place corpus names are read."""
    key = source.strip().lower()
    if key.startswith("tfds:"):
        return tfds_text_file(source.strip()[5:], data_dir)
    if key == "tiny_shakespeare":
        return tiny_shakespeare_file(data_dir)
    if key in ("kjv", "bible"):
        path = default_bible_path(data_dir)
        if not os.path.isfile(path):
            write_bible_text(path)
        return path
    return None


def is_corpus_name(source: str) -> bool:
    """Whether `source` is a known corpus name rather than a path (see `corpus_file`)."""
    key = source.strip().lower()
    return key in TEXT_CORPUS_NAMES or key.startswith("tfds:")


def load_text_corpus(name_or_path: str, data_dir: str | None = None) -> str:
    """Returns a text corpus: a known corpus name (`corpus_file`) or a path to a UTF-8 file."""
    if name_or_path.strip().lower() == "tiny_shakespeare":
        return load_tiny_shakespeare(data_dir)  # no copy written: read where it is
    path = corpus_file(name_or_path, data_dir) or os.path.expanduser(name_or_path)
    if not os.path.isfile(path):
        raise DatasetUnavailableError(
            f"Text corpus {name_or_path!r} is neither a known corpus name "
            f"({', '.join(TEXT_CORPUS_NAMES)}, tfds:NAME) nor an existing file (looked for "
            f"{os.path.abspath(path)}). Pass one of those names or a path to a UTF-8 text file."
        )
    try:
        text = _read_text_file(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"Text corpus {path} is not valid UTF-8: {e}") from e
    if not text:
        raise ValueError(f"Text corpus {path} is empty.")
    return text
