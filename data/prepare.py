"""Tokenizes a text corpus once into shards of token ids on disk, for training at any scale.

    python -m data.prepare --source=tiny_shakespeare --tokenizer=char --out=.data/tokens/shakespeare
    python -m data.prepare --source='data/books/*.txt' --tokenizer=bpe --vocab_size=8192 --out=...
    python -m data.prepare --source=corpus.jsonl --text_field=text --tokenizer=/path/tokenizer.json
    python -m data.prepare ... --num_shards=64 --shard_index=$SLURM_ARRAY_TASK_ID   # one slice

Sources: one text file, a glob or a directory of files (*.txt, *.jsonl), JSONL with a text field
(one document a line), the known corpora 'tiny_shakespeare' and 'kjv', and TFDS text datasets
('tfds:NAME', needs TensorFlow). Tokenizers: 'char' (the corpus's character set), 'byte',
'sentencepiece' and 'bpe' (byte-level BPE, Hugging Face's `tokenizers`), the last two trained on a
bounded sample of the corpus, or the path of any Hugging Face tokenizer.json (GPT-2's, say).

The corpus is cut into units (a file, or a newline-aligned byte range of a large one), tokenized
in parallel by a process pool, one shard `shards/NNNNN.bin` per unit (uint16 ids when the
vocabulary fits, uint32 otherwise; documents separated by the tokenizer's end-of-text token
where it has one). Each shard is written under a temporary name and renamed when complete, with
a sidecar `NNNNN.json` (token count, sha256): a rerun skips finished shards and redoes a cut-off
one. `--num_shards/--shard_index` do one slice of the units, so a batch scheduler can spread
them over machines; whichever invocation finds every unit done writes `manifest.json` (the
tokenizer and its files, vocabulary size, dtype, per-shard counts and checksums, the separator,
and the validation range: the last `--val_fraction` of the token stream, as nanoGPT splits).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import flags

from data import manifest, sources, tokenization
from data.manifest import MANIFEST, SHARDS, PrepareError, read_manifest, source_stamps
from runtime import cli

UNIT_BYTES = 64 << 20  # a large file is cut into units of about this many bytes
TOKENIZER_SAMPLE_BYTES = 64 << 20  # what SentencePiece and BPE are trained on, at most


# ----------------------------------------------------------------------------- sources


def source_files(source: str, data_dir: str | None = None) -> list[str]:
    """The files of `source` (a known corpus name, a file, a glob or a directory), sorted."""
    corpus = sources.corpus_file(source, data_dir)
    if corpus is not None:
        return [corpus]
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
        files = [f for f in files if f.endswith((".txt", ".jsonl", ".json", ".md"))]
    elif any(c in path for c in "*?["):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise PrepareError(
            f"--source={source!r} names no text: not a known corpus "
            f"({', '.join(sources.TEXT_CORPUS_NAMES)}), nor a file, glob or directory with "
            "files (looked at " + os.path.abspath(path) + ")."
        )
    return sorted(os.path.abspath(f) for f in files)


def _units(files: list[str], unit_bytes: int) -> list[tuple[str, int, int]]:
    """(file, start, end) byte ranges: whole files, large ones cut into pieces of about
    `unit_bytes`. A cut falls only after a newline that a non-whitespace character follows: no
    token of a GPT-2-style byte-level BPE (its pre-tokenizer never joins a newline to the
    next word) or of SentencePiece spans such a point, so a document's tokens do not depend on
    where preparation cut it for parallel work (tested for every tokenizer kind)."""
    units = []
    for path in files:
        size = os.path.getsize(path)
        start = 0
        with open(path, "rb") as f:
            while start < size:
                end = min(start + unit_bytes, size)
                if end < size:
                    f.seek(end)
                    end += len(f.readline())  # to the end of the line: never inside a character
                    while end < size and _starts_with_space(line := f.readline()):
                        end += len(line)
                units.append((path, start, end))
                start = end
        if size == 0:
            units.append((path, 0, 0))
    return units


def _starts_with_space(line: bytes) -> bool:
    """Whether a line (bytes, from the start of a line) begins with whitespace, Unicode's
    included; undecodable bytes count as text (they are reported when the unit is read)."""
    try:
        return line.decode("utf-8")[:1].isspace()
    except UnicodeDecodeError:
        return line[:1].isspace()


def _documents(unit: tuple[str, int, int], text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends a document) pairs of a unit: a text file is one document (its last unit
    ends it), a JSONL file one document a line, holding its `text_field`. JSON Lines are split
    on "\n" alone: U+2028 or U+0085 inside a JSON string is text, not a line break. PrepareError
    naming the file and byte offset if the bytes are not UTF-8."""
    path, start, end = unit
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{path} is not UTF-8 text: byte {start + e.start} ({data[e.start : e.start + 1]!r}) "
            "does not decode. Convert it (e.g. iconv -t UTF-8) or leave it out of --source."
        ) from None
    if path.endswith((".jsonl", ".json")):
        for number, line in enumerate(text.split("\n")):
            if line.strip():
                try:
                    yield json.loads(line)[text_field], True
                except (ValueError, KeyError, TypeError) as e:
                    raise PrepareError(
                        f"{path}: a line after byte {start} (line {number + 1} of the range) is "
                        f"not a JSON object with a {text_field!r} field ({e}); set --text_field."
                    ) from None
    else:
        yield text, end == os.path.getsize(path)


# ----------------------------------------------------------------------------- tokenizer


def _sample(units: list[tuple[str, int, int]], text_field: str, limit: int) -> Iterator[str]:
    """Up to `limit` bytes of documents, spread over the units (round-robin), for training."""
    per_unit = max(1, limit // max(1, len(units)))
    for unit in units:
        taken = 0
        for doc, _ in _documents(unit, text_field):
            yield doc[: per_unit - taken]
            taken += len(doc)
            if taken >= per_unit:
                break


def _char_set(unit_and_field: tuple[tuple[str, int, int], str]) -> set[str]:
    unit, text_field = unit_and_field
    chars: set[str] = set()
    for doc, _ in _documents(unit, text_field):
        chars.update(doc)
    return chars


def build_tokenizer(kind: str, units: list, text_field: str, vocab_size: int | None,
                    workers: int) -> tokenization.Tokenizer:  # fmt: skip
    """The tokenizer `kind` names, built from the corpus (or loaded from a tokenizer.json)."""
    if kind.endswith(".json"):
        return tokenization.BPETokenizer.from_file(kind)
    if kind == "byte":
        return tokenization.ByteTokenizer()
    if kind == "char":  # the whole corpus's character set: one parallel pass
        with _pool(workers, len(units)) as pool:
            chars = set().union(*pool.map(_char_set, [(u, text_field) for u in units]))
        if not chars:
            raise PrepareError("The corpus is empty: no characters to build a vocabulary of.")
        return tokenization.CharTokenizer(sorted(chars))
    sample = _sample(units, text_field, TOKENIZER_SAMPLE_BYTES)
    if kind == "sentencepiece":
        text = "\n".join(sample)
        return tokenization.build_tokenizer("sentencepiece", text, vocab_size)
    if kind == "bpe":
        return tokenization.BPETokenizer.train(
            sample, vocab_size or tokenization.DEFAULT_BPE_VOCAB_SIZE
        )
    raise PrepareError(
        f"--tokenizer={kind!r}: choose one of {tokenization.TOKENIZER_KINDS} or the path of a "
        "Hugging Face tokenizer.json."
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------- shards


_WORKER_TOKENIZER: Any = None


def _init_worker(out: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenization.load_tokenizer(out)


def _write_shard(args: tuple[int, tuple[str, int, int], str, str]) -> tuple[int, int, int]:
    """Tokenizes one unit into shards/NNNNN.bin (+ .json); returns (index, tokens, text bytes)."""
    index, unit, text_field, out = args
    tokenizer = _WORKER_TOKENIZER
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    pieces = []
    for doc, ends_document in _documents(unit, text_field):
        pieces.append(tokenizer.encode(doc))  # ordinary text: "<|endoftext|>" is not the id
        if eot is not None and ends_document:  # the one separator preparation inserts
            pieces.append(np.asarray([eot], np.int32))
    ids = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    base = os.path.join(out, SHARDS, f"{index:05d}")
    data = ids.astype(dtype).tobytes()
    tmp = f"{base}.bin.tmp{os.getpid()}"  # per process: two invocations may race on a unit
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, base + ".bin")
    record = {"file": f"{SHARDS}/{index:05d}.bin", "tokens": int(ids.size),
              "sha256": hashlib.sha256(data).hexdigest(), "unit": list(unit),
              "source_file": source_stamps([unit[0]])[0]}  # fmt: skip
    with open(f"{base}.json.tmp{os.getpid()}", "w") as f:
        json.dump(record, f)
    # The shard is done once its sidecar exists.
    os.replace(f"{base}.json.tmp{os.getpid()}", base + ".json")
    return index, int(ids.size), unit[2] - unit[1]


class _InProcess:
    """The executor interface, in this process: one unit of work needs no pool."""

    def __init__(self, out: str | None):
        if out is not None:
            _init_worker(out)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, items: list) -> Iterator[Any]:
        return map(fn, items)


def _pool(workers: int, jobs: int, out: str | None = None) -> Any:
    """A process pool of at most `workers` for `jobs` units ("spawn": a forked copy of a
    process that runs JAX threads can deadlock), or this process for a single unit."""
    if min(workers, jobs) <= 1:
        return _InProcess(out)
    kwargs = {"initializer": _init_worker, "initargs": (out,)} if out else {}
    return concurrent.futures.ProcessPoolExecutor(
        min(workers, jobs), mp_context=multiprocessing.get_context("spawn"), **kwargs
    )


@contextlib.contextmanager
def _lock(out: str) -> Iterator[None]:
    """Serialises the steps that must happen once (tokenizer, manifest) across invocations."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(
    source: str,
    tokenizer: str,
    out: str,
    *,
    vocab_size: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    num_shards: int = 1,
    shard_index: int = 0,
    workers: int | None = None,
    unit_bytes: int = UNIT_BYTES,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Prepares `source` into `out` (see the module docstring); returns the manifest, or None
    when units of other slices are still missing. Idempotent: finished shards are kept."""
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction={val_fraction} must be in (0, 1).")
    if not 0 <= shard_index < num_shards:
        raise PrepareError(f"--shard_index={shard_index} is not in [0, --num_shards).")
    out = os.path.abspath(out)
    files = source_files(source, data_dir)
    wanted = manifest.recipe(source, files, tokenizer, vocab_size=vocab_size,
                             text_field=text_field, val_fraction=val_fraction,
                             unit_bytes=unit_bytes)  # fmt: skip
    workers = workers or os.cpu_count() or 1
    with _lock(out):  # one records the recipe and builds the tokenizer; the others check them
        manifest.check_or_record(out, wanted)
        if os.path.exists(os.path.join(out, MANIFEST)):
            return read_manifest(out)
        units = _units(files, unit_bytes)
        os.makedirs(os.path.join(out, SHARDS), exist_ok=True)
        if not os.path.exists(os.path.join(out, tokenization.TOKENIZER_JSON)):
            build_tokenizer(tokenizer, units, text_field, vocab_size, workers).save(out)
    mine = [i for i in range(len(units)) if i % num_shards == shard_index]
    todo = [i for i in mine if not os.path.exists(_sidecar(out, i))]
    total = sum(units[i][2] - units[i][1] for i in todo)
    if todo:
        bar = _progress(total, f"tokenizing {len(todo)} of {len(units)} units", progress)
        with _pool(workers, len(todo), out) as pool:
            jobs = [(i, units[i], text_field, out) for i in todo]
            for _, _, nbytes in pool.map(_write_shard, jobs):
                bar.update(nbytes)
        bar.close()
    with _lock(out):
        if os.path.exists(os.path.join(out, MANIFEST)):
            return read_manifest(out)
        if not all(os.path.exists(_sidecar(out, i)) for i in range(len(units))):
            return None  # another slice's units are still running: its invocation finishes
        return _write_manifest(out, wanted, units)


def _sidecar(out: str, index: int) -> str:
    return os.path.join(out, SHARDS, f"{index:05d}.json")


def _progress(total: int, what: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=what, disable=not enabled,
                file=sys.stderr, smoothing=0.1)  # fmt: skip


def _write_manifest(out: str, wanted: dict[str, Any], units: list) -> dict[str, Any]:
    """The manifest, once every unit's shard is done: PrepareError if a source file is no
    longer what the recipe recorded, or a shard was tokenized from another version of it."""
    now = source_stamps([stamp["path"] for stamp in wanted["source_files"]])
    if changed := manifest.differences(wanted, {**wanted, "source_files": now}):
        raise PrepareError(
            f"A source changed while {out} was being prepared: {'; '.join(changed)}. "
            f"Delete {out} and prepare it again."
        )
    stamps = {stamp["path"]: stamp for stamp in now}
    tokenizer = tokenization.load_tokenizer(out)
    shards = []
    for i, unit in enumerate(units):
        with open(_sidecar(out, i)) as f:
            record = json.load(f)
        if record.get("unit") != list(unit) or record.get("source_file") != stamps[unit[0]]:
            raise PrepareError(
                f"{_sidecar(out, i)} was tokenized from another version of {unit[0]}. "
                f"Delete {out} and prepare it again."
            )
        shards.append({k: record[k] for k in ("file", "tokens", "sha256")})
    num_tokens = sum(s["tokens"] for s in shards)
    n_train = int(num_tokens * (1.0 - wanted["val_fraction"]))  # nanoGPT: the first 90% trains
    files = sorted(n for n in os.listdir(out) if n.startswith("tokenizer"))
    record = {
        "format": manifest.FORMAT,
        "source": wanted["source"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "recipe": wanted,
        "tokenizer": {
            "kind": tokenizer.kind,
            "argument": wanted["tokenizer"],
            "files": files,
            "vocab_size": tokenizer.vocab_size,
        },  # fmt: skip
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "document_separator": tokenizer.eot_id,
        "num_tokens": num_tokens,
        "source_files": wanted["source_files"],
        "val_fraction": wanted["val_fraction"],
        "splits": {"train": [0, n_train], "val": [n_train, num_tokens]},
        "shards": shards,
    }
    with open(os.path.join(out, MANIFEST + ".tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))
    return record


# ----------------------------------------------------------------------------- on first use


def cache_name(source: str, tokenizer: str, vocab_size: int | None = None,
               val_fraction: float = 0.1) -> str:  # fmt: skip
    """A folder name for `source` prepared with `tokenizer` and split: the corpus name, or a
    path's base name and a digest of where it is, then the tokenizer and any non-default size
    or validation fraction (so differently prepared copies never share a folder)."""
    source = source.strip()
    if sources.is_corpus_name(source):
        stem = source.lower().replace(":", "_")
    else:  # a path: its name and a digest of where it is
        path = os.path.abspath(os.path.expanduser(source))
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        stem = f"{os.path.basename(path.rstrip('/')).replace('*', 'x')}-{digest}"
    if tokenizer.endswith(".json"):
        tokenizer = "hf-" + hashlib.sha256(os.path.abspath(tokenizer).encode()).hexdigest()[:8]
    parts = [stem, tokenizer]
    if vocab_size is not None:
        parts.append(f"v{vocab_size}")
    if val_fraction != 0.1:
        parts.append(f"val{val_fraction:g}")
    return "-".join(parts)


def prepared_cache(source: str, tokenizer: str, *, vocab_size: int | None = None,
                   val_fraction: float = 0.1, data_dir: str | None = None) -> str:  # fmt: skip
    """The prepared directory for a corpus name or text path, in the tokens folder
    (`sources.default_tokens_dir`), prepared on first use; a source changed since is prepared
    again (the old tokens are kept aside, never reused). Returns the directory."""
    import jax  # only to let one process of several move a stale cache aside

    out = os.path.join(sources.default_tokens_dir(data_dir),
                       cache_name(source, tokenizer, vocab_size, val_fraction))  # fmt: skip
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.isdir(out) and jax.process_index() == 0:
        # The whole recipe, the source's current file list included (a file added to a
        # directory counts), against what the tokens were made from.
        wanted = manifest.recipe(source, source_files(source, data_dir), tokenizer,
                                 vocab_size=vocab_size, text_field="text",
                                 val_fraction=val_fraction, unit_bytes=UNIT_BYTES)  # fmt: skip
        try:
            with open(os.path.join(out, manifest.RECIPE)) as f:
                stale = manifest.differences(json.load(f), wanted)
        except (OSError, ValueError):
            stale = ["no record of its source"]
        if stale:
            aside = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, aside)  # a cache of the source: made again, the old one kept aside
            print(f"{source} is not what {out} was prepared from ({'; '.join(stale)}); "
                  f"preparing it again (the old tokens are in {aside}).", flush=True)  # fmt: skip
    if not os.path.isfile(manifest_path):
        if jax.process_index() == 0:
            print(f"Preparing {source} with the {tokenizer} tokenizer into {out} (once; later "
                  "runs read it from there).", flush=True)  # fmt: skip
        prepare(source, tokenizer, out, vocab_size=vocab_size, val_fraction=val_fraction,
                data_dir=data_dir, progress=False)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- make data


def prepare_all(data_dir: str | None = None) -> int:
    """Prepares all datasets (idempotent), printing one status line each; returns the exit code:
    1 if Fashion-MNIST or Tiny Shakespeare is unavailable (the KJV text is optional), else 0."""
    data_dir = data_dir or sources.default_data_dir()
    exit_code = 0

    try:
        if not sources.is_prepared("fashion_mnist", data_dir):
            print(f"fashion_mnist: preparing in {data_dir} (about 30 s) ...", flush=True)
        sources.prepare_fashion_mnist(data_dir)
        sizes = sources.split_sizes("fashion_mnist", data_dir)
        print(f"fashion_mnist: ready ({sizes['train']} train / {sizes['test']} test)", flush=True)
    except sources.DatasetUnavailableError as e:
        print(f"fashion_mnist: UNAVAILABLE\n{e}", file=sys.stderr, flush=True)
        exit_code = 1

    try:
        if not sources.is_prepared("tiny_shakespeare", data_dir):
            print(f"tiny_shakespeare: preparing in {data_dir} ...", flush=True)
        sources.prepare_tiny_shakespeare(data_dir)
        n = sources.TINY_SHAKESPEARE_NUM_CHARS
        n_train = int(n * 0.9)
        n_val = int((n - n_train) * 0.5)
        print(
            f"tiny_shakespeare: ready ({n} chars: {n_train} train / {n_val} validation / "
            f"{n - n_train - n_val} test)",
            flush=True,
        )
    except sources.DatasetUnavailableError as e:
        print(f"tiny_shakespeare: UNAVAILABLE\n{e}", file=sys.stderr, flush=True)
        exit_code = 1

    bible_path = sources.default_bible_path(data_dir)
    if os.path.isfile(bible_path) or shutil.which(sources.BIBLE_COMMAND):
        try:
            if not os.path.isfile(bible_path):
                sources.write_bible_text(bible_path)
            size = os.path.getsize(bible_path)
            print(f"kjv: ready ({size} bytes at {bible_path})", flush=True)
        except sources.DatasetUnavailableError as e:
            print(f"kjv: UNAVAILABLE (optional)\n{e}", file=sys.stderr, flush=True)
    else:
        print(
            f"kjv: skipped (optional; `sudo apt-get install {sources.BIBLE_PACKAGE}` provides it)",
            flush=True,
        )
    for corpus in ("tiny_shakespeare", "kjv"):
        if corpus == "kjv" and not os.path.isfile(bible_path):
            continue
        for tokenizer in ("char", "byte"):
            exit_code |= _prepare_tokens(corpus, tokenizer, data_dir)
    return exit_code


def _prepare_tokens(corpus: str, tokenizer: str, data_dir: str) -> int:
    """Tokenizes a known corpus once into the tokens folder, as training on it would."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = prepared_cache(corpus, tokenizer, data_dir=data_dir)
    except sources.DatasetUnavailableError as e:
        print(f"{corpus} ({tokenizer} tokens): UNAVAILABLE\n{e}", file=sys.stderr, flush=True)
        return 1
    print(f"{corpus} ({tokenizer} tokens): ready in {out}", flush=True)
    return 0


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_string("source", None, "Corpus: a name, a file, a glob or a directory.")
    flags.DEFINE_string("tokenizer", "char", "char, byte, sentencepiece, bpe or a tokenizer.json.")
    flags.DEFINE_string("out", None, "Directory for the shards, tokenizer and manifest.")
    flags.DEFINE_integer("vocab_size", None, "sentencepiece and bpe: the vocabulary size.")
    flags.DEFINE_string("text_field", "text", "JSONL sources: the field holding the text.")
    flags.DEFINE_float("val_fraction", 0.1, "The last fraction of tokens held out (nanoGPT).")
    flags.DEFINE_integer("num_shards", 1, "Slices of the work (array jobs).", lower_bound=1)
    flags.DEFINE_integer("shard_index", 0, "This invocation's slice.", lower_bound=0)
    flags.DEFINE_integer("workers", None, "Processes (default: every core).", lower_bound=1)
    flags.mark_flags_as_required(["source", "out"])


def main(argv: list[str]) -> None:
    """Prepares and prints the manifest's summary."""
    del argv
    start = time.perf_counter()
    manifest = prepare(FLAGS.source, FLAGS.tokenizer, FLAGS.out, vocab_size=FLAGS.vocab_size,
                       text_field=FLAGS.text_field, val_fraction=FLAGS.val_fraction,
                       num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
                       workers=FLAGS.workers)  # fmt: skip
    seconds = time.perf_counter() - start
    if manifest is None:
        print(f"Slice {FLAGS.shard_index} of {FLAGS.num_shards} done in {seconds:.1f} s; the "
              "manifest is written when the last slice finishes.")  # fmt: skip
        return
    t = manifest["tokenizer"]
    print(f"{FLAGS.out}: {manifest['num_tokens']:,} tokens ({manifest['dtype']}) in "
          f"{len(manifest['shards'])} shards, {t['kind']} tokenizer of {t['vocab_size']:,}; "
          f"validation = tokens {manifest['splits']['val'][0]:,} to "
          f"{manifest['splits']['val'][1]:,} ({seconds:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    cli.run(main)
