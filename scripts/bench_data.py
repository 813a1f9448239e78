"""Measures the language-model data path: preparation, the memmap loader, memory and start-up.

    python scripts/bench_data.py [--work=/tmp/jaxlab_bench_data] [--big_gb=4] [--startup_gb=1]

Prints one line per measurement and a JSON line at the end:
- prepare throughput (MB of text per second) per tokenizer, with 1 and 2 worker processes, on
  the King James Bible copied into 8 files (about 35 MB);
- loader throughput for GPT-2-shaped batches (64 windows of 1,025 tokens) on one core;
- peak RSS of a short training run (train.py, a small GPT, 20 steps) on a generated corpus of
  `--big_gb` GB of tokens, against the same run on Tiny Shakespeare;
- time from the command to step 1 on a generated `--startup_gb` GB corpus, and how much of it
  is opening the data (the shards' checksums are verified once, then cached).
The generated corpora (random byte-level tokens) are written under --work and not kept in git.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from runtime import cli  # noqa: E402

FLAGS = flags.FLAGS


def _kjv_files(work: str) -> tuple[str, int]:
    from data import sources

    source = sources.default_bible_path()
    if not os.path.isfile(source):
        sources.write_bible_text(source)
    directory = os.path.join(work, "kjv8")
    os.makedirs(directory, exist_ok=True)
    for i in range(8):
        shutil.copy(source, os.path.join(directory, f"kjv{i}.txt"))
    return directory, 8 * os.path.getsize(source)


def prepare_throughput(work: str) -> dict[str, float]:
    """MB of text per second per tokenizer and worker count (a fresh output each time)."""
    from data import prepare

    directory, nbytes = _kjv_files(work)
    results = {}
    for kind in ("char", "byte", "sentencepiece", "bpe"):
        for workers in (1, 2):
            out = os.path.join(work, f"prep-{kind}-{workers}")
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            prepare.prepare(f"{directory}/*.txt", kind, out, vocab_size=4096,
                                 workers=workers, progress=False)  # fmt: skip
            seconds = time.perf_counter() - start
            results[f"prepare_{kind}_{workers}proc_MB_per_s"] = nbytes / 1e6 / seconds
            print(f"prepare {kind:13s} {workers} process(es): {nbytes / 1e6 / seconds:7.2f} MB/s "
                  f"({seconds:.1f} s for {nbytes / 1e6:.0f} MB, tokenizer training included)",
                  flush=True)  # fmt: skip
    return results


def synthetic_corpus(out: str, gigabytes: float, shards: int = 8) -> str:
    """A prepared directory of random byte-level tokens (uint16), `gigabytes` GB in all."""
    from data import manifest as shards_format
    from data import tokenization

    if os.path.isfile(os.path.join(out, shards_format.MANIFEST)):
        return out
    os.makedirs(os.path.join(out, shards_format.SHARDS), exist_ok=True)
    per_shard = int(gigabytes * 1e9 / 2 / shards)
    rng = np.random.default_rng(0)
    records = []
    for i in range(shards):
        path = os.path.join(out, shards_format.SHARDS, f"{i:05d}.bin")
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            for start in range(0, per_shard, 1 << 26):
                chunk = rng.integers(0, 256, min(1 << 26, per_shard - start), np.uint16)
                data = chunk.tobytes()
                f.write(data)
                digest.update(data)
        records.append({"file": f"{shards_format.SHARDS}/{i:05d}.bin", "tokens": per_shard,
                        "sha256": digest.hexdigest()})  # fmt: skip
    tokenization.ByteTokenizer().save(out)
    total = per_shard * shards
    record = {
        "format": shards_format.FORMAT, "source": "synthetic", "dtype": "uint16",
        "tokenizer": {"kind": "byte", "argument": "byte", "vocab_size": 256, "files": []},
        "document_separator": None, "num_tokens": total, "val_fraction": 0.1,
        "splits": {"train": [0, int(total * 0.9)], "val": [int(total * 0.9), total]},
        "shards": records,
    }  # fmt: skip
    with open(os.path.join(out, shards_format.MANIFEST), "w") as f:
        json.dump(record, f)
    return out


def loader_throughput(directory: str, batches: int = 300) -> float:
    """Tokens per second of 64 x 1025-token windows from the memmap loader, on one core."""
    from data import text_windows

    splits = text_windows.TextSplits(directory, 1024)
    iterator = splits.train_batches(seed=0, global_batch=64)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    rate = batches * 64 * 1025 / seconds
    print(f"loader: {rate / 1e6:.1f} M tokens/s (64 x 1025-token batches, one core)", flush=True)
    return rate


def _train(dataset: str, workdir: str, steps: int = 20) -> tuple[float, float, float]:
    """(peak RSS in MB, seconds from the command to step 1, seconds of the whole run)."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "train.py", "--config=configs/shakespeare_char_cpu.py",
               f"--workdir={workdir}", f"--config.dataset={dataset}", "--config.tokenizer=byte",
               f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
               "--config.eval_every_steps=1000000", "--config.eval_steps=2",
               "--config.sample_every_eval=False", "--config.steps_per_dispatch=1"]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    first_step = None
    for line in process.stdout:
        if first_step is None and re.match(r"step 1/", line):
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    process.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return usage.ru_maxrss / 1024, first_step or float("nan"), total  # KiB -> MiB


def define_flags() -> None:
    flags.DEFINE_string("work", "/tmp/jaxlab_bench_data", "Scratch folder (large files).")
    flags.DEFINE_float("big_gb", 4.0, "Size of the generated corpus for the memory measurement.")
    flags.DEFINE_float("startup_gb", 1.0, "Size of the generated corpus for the start-up time.")


def main(argv: list[str]) -> None:
    del argv
    work = FLAGS.work
    os.makedirs(work, exist_ok=True)
    results = prepare_throughput(work)
    small = os.path.join(work, "startup")
    synthetic_corpus(small, FLAGS.startup_gb)
    results["loader_tokens_per_s"] = loader_throughput(small)

    rss_small, _, _ = _train("tiny_shakespeare", os.path.join(work, "run-small"))
    big = synthetic_corpus(os.path.join(work, "big"), FLAGS.big_gb)
    rss_big, _, _ = _train(big, os.path.join(work, "run-big"))
    results.update(peak_rss_tiny_shakespeare_MB=rss_small, peak_rss_big_corpus_MB=rss_big)
    print(f"peak RSS: {rss_big:.0f} MB on {FLAGS.big_gb:g} GB of tokens, {rss_small:.0f} MB on "
          f"Tiny Shakespeare (difference {rss_big - rss_small:+.0f} MB)", flush=True)  # fmt: skip

    from data import text_windows

    start = time.perf_counter()
    text_windows.TextSplits(small, 64)  # checksums already cached by the runs above
    open_s = time.perf_counter() - start
    _, first_step, _ = _train(small, os.path.join(work, "run-startup"), steps=2)
    results.update(startup_open_data_s=open_s, startup_command_to_step1_s=first_step)
    print(f"start-up on {FLAGS.startup_gb:g} GB of tokens: {first_step:.1f} s from the command "
          f"to step 1 (opening the data: {open_s:.2f} s; the rest is Python, JAX and the "
          "compilation)", flush=True)  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
