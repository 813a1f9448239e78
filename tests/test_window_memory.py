"""Host memory stays flat while a run reads its corpus: reading many random windows from a
large prepared corpus leaves the process's resident memory where it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from data import manifest as shards_format
from data import tokenization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_TOKENS = 96 << 20  # 192 MB of uint16 tokens in 4 shards


def _large_corpus(out: str, shards: int = 4) -> None:
    """A prepared directory of byte tokens (a repeating pattern: fast to write)."""
    os.makedirs(os.path.join(out, shards_format.SHARDS))
    per_shard = CORPUS_TOKENS // shards
    tokens = (np.arange(per_shard, dtype=np.uint32) % 251).astype(np.uint16).tobytes()
    digest = hashlib.sha256(tokens).hexdigest()
    records = []
    for i in range(shards):
        name = f"{shards_format.SHARDS}/{i:05d}.bin"
        with open(os.path.join(out, name), "wb") as f:
            f.write(tokens)
        records.append({"file": name, "tokens": per_shard, "sha256": digest})
    tokenization.ByteTokenizer().save(out)
    n_train = int(CORPUS_TOKENS * 0.9)
    record = {
        "format": shards_format.FORMAT, "source": "test", "dtype": "uint16",
        "tokenizer": {"kind": "byte", "argument": "byte", "vocab_size": 256, "files": []},
        "document_separator": None, "num_tokens": CORPUS_TOKENS, "val_fraction": 0.1,
        "splits": {"train": [0, n_train], "val": [n_train, CORPUS_TOKENS]},
        "shards": records,
    }  # fmt: skip
    with open(os.path.join(out, shards_format.MANIFEST), "w") as f:
        json.dump(record, f)


def test_resident_memory_does_not_grow_with_the_windows_read(tmp_path):
    """400 training batches of 64 random 1,025-token windows (26,000 windows, spread over a
    192 MB corpus): the file-backed resident memory of the reading process grows by less than
    16 MB (read through a memory map, each window kept ~64 KB of neighbouring pages mapped:
    the process would map in most of the corpus)."""
    out = str(tmp_path / "corpus")
    _large_corpus(out)
    script = textwrap.dedent(f"""
        from data import text_windows

        def rss_file_mb():
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["RssFile"].split()[0]) / 1024

        splits = text_windows.TextSplits({out!r}, 1024)
        batches = splits.train_batches(seed=0, global_batch=64, stop_step=400)
        next(batches)
        before = rss_file_mb()
        checksum = sum(int(b["inputs"][0, 0]) for b in batches)
        print(before, rss_file_mb(), checksum)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    before, after, _ = map(float, result.stdout.split())
    assert after - before < 16, f"file-backed RSS grew from {before:.0f} MB to {after:.0f} MB"
