"""What a prepared token directory records about how it was made, and the checks that keep it
from ever being reused for anything else.

A prepared directory holds `recipe.json` from the moment its preparation starts: the source as
given, every source file with its size and modification time, the tokenizer argument and its
settings, the text field, the validation fraction and the unit size. Every later invocation
(another `--shard_index`, a rerun, training's prepare-on-first-use) compares its own recipe with
it; each shard's sidecar records its unit and that unit's file stamp; `manifest.json`, written
once every shard is done, carries the recipe. A difference is never reused silently:
`python -m data.prepare` refuses naming what differs, and a corpus prepared on first use is
prepared again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from data import sources

MANIFEST = "manifest.json"
RECIPE = "recipe.json"
SHARDS = "shards"
FORMAT = "jaxlab-token-shards/2"  # /2: the recipe is recorded (older directories are refused)


class PrepareError(sources.DatasetUnavailableError):
    """The corpus or the options cannot be prepared; the message names the file and the fix."""


def source_stamps(files: list[str]) -> list[dict[str, Any]]:
    """(path, size, modification time in ns) of each source file: a changed source is seen."""
    return [{"path": f, "size": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files]  # fmt: skip


def recipe(source: str, files: list[str], tokenizer: str, *, vocab_size: int | None,
           text_field: str, val_fraction: float, unit_bytes: int) -> dict[str, Any]:  # fmt: skip
    """Everything that decides a prepared directory's tokens, as JSON-ready values."""
    if tokenizer.endswith(".json"):  # a tokenizer file: where it is and what it holds
        tokenizer = os.path.abspath(tokenizer)
        stamp = source_stamps([tokenizer])[0]
        tokenizer_file = {"size": stamp["size"], "mtime_ns": stamp["mtime_ns"]}
    else:
        tokenizer_file = None
    return {
        "source": source.strip(),
        "source_files": source_stamps(files),
        "tokenizer": tokenizer,
        "tokenizer_file": tokenizer_file,
        "vocab_size": vocab_size,
        "text_field": text_field,
        "val_fraction": float(val_fraction),
        "unit_bytes": int(unit_bytes),
    }


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two recipes (empty when they are the same)."""
    found = []
    for key in sorted(set(recorded) | set(wanted)):
        if key == "source_files" or recorded.get(key) == wanted.get(key):
            continue
        found.append(f"{key}: {recorded.get(key)!r} there, {wanted.get(key)!r} now")
    old = {s["path"]: s for s in recorded.get("source_files", [])}
    new = {s["path"]: s for s in wanted.get("source_files", [])}
    for path in sorted(set(old) - set(new)):
        found.append(f"{path}: a source file there, gone now")
    for path in sorted(set(new) - set(old)):
        found.append(f"{path}: a source file now, not there")
    for path in sorted(set(old) & set(new)):
        if old[path] != new[path]:
            found.append(f"{path}: changed (size {old[path]['size']} -> {new[path]['size']}, "
                          "or its modification time)")  # fmt: skip
    return found


def check_or_record(out: str, wanted: dict[str, Any]) -> None:
    """Writes `wanted` as out's recipe where none is recorded yet; PrepareError naming every
    difference where out was (or is being) prepared from something else."""
    path = os.path.join(out, RECIPE)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out, MANIFEST)) or os.path.isdir(os.path.join(out, SHARDS)):
            raise PrepareError(
                f"{out} holds tokens prepared without a record of their source (an older "
                "format): delete it, or choose another --out."
            )
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(wanted, f, indent=1)
        os.replace(path + ".tmp", path)
        return
    with open(path) as f:
        recorded = json.load(f)
    if diff := differences(recorded, wanted):
        raise PrepareError(
            f"{out} was prepared from something else than this call asks for: "
            + "; ".join(diff)
            + ". Choose another --out, or delete it to prepare it anew."
        )


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a prepared directory; FileNotFoundError naming the fix if absent."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a prepared dataset (or its preparation has "
            "not finished: rerun `python -m data.prepare` with the same arguments)."
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise PrepareError(
            f"{path} is not a {FORMAT} manifest (found {manifest.get('format')!r}): prepare the "
            "corpus again with `python -m data.prepare`."
        )
    return manifest
