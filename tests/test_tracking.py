"""config.wandb: Weights & Biases gets the TensorBoard scalars, the config and the final
metrics; tested offline (files only), with every W&B path and the server address pointed into
the test's own folders so nothing can reach the network or a real account."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

import train
from runtime import metrics_writer, provenance, tracking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch) -> str:
    """No credentials, no home files, an unreachable server (port 9, discard): offline or
    failing, never the network or a login prompt."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return str(tmp_path)


def read_wandb_records(path: str) -> Iterator:
    """The records of a .wandb file (wandb_internal_pb2.Record): W&B's transaction log, a
    LevelDB-style log ('log_format.md' of LevelDB: 32 KiB blocks, each record chunk headed by
    crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last)) after a 7-byte
    file header ':W&B', magic 0xBEE1, version. wandb 0.31 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"not a .wandb file: {data[:7]!r}"
    block, pos, chunks = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_offline_run_holds_the_tensorboard_scalars_config_and_summary(
    tiny_lm_config, wandb_sandbox
) -> None:
    """Every scalar of metrics.jsonl (the TensorBoard scalars) is in the W&B history at its
    step with the same value; the config and the final metrics (goodput included) are the run's
    config and summary; the attempt's provenance record is in both."""
    workdir = os.path.join(wandb_sandbox, "run")
    tiny_lm_config.wandb.mode = "offline"
    tiny_lm_config.wandb.name = "tiny-offline"
    tiny_lm_config.sample_every_eval = False  # text samples are not scalars; spares a compile
    final = train.train_and_evaluate(tiny_lm_config, workdir)

    (run_file,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    with open(os.path.join(workdir, tracking.RUN_ID_FILE)) as f:
        assert os.path.basename(run_file) == f"run-{f.read().strip()}.wandb"
    history, summary, config, name = {}, {}, {}, None
    for record in read_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            name = record.run.display_name
        elif kind == "config":  # run.config.update after the start
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})

    expected = {}
    for row in metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        expected.setdefault(row.pop("step"), {}).update(row)
    assert sorted(expected) == [4, 6, 8, 12]
    for step, scalars in expected.items():
        logged = {k: v for k, v in history[step].items() if not k.startswith("_")}
        assert logged == scalars, step
    assert sorted(history) == sorted(expected)

    assert name == "tiny-offline"
    assert config["optimizer"] == "adamw" and config["model"]["embed_dim"] == 32
    assert config["wandb"]["mode"] == "offline"
    for key in ("val_loss", "train_loss", "val_bits_per_char", "num_params", "git_commit"):
        assert summary[key] == final[key]
    assert summary["goodput"]["goodput"] == final["goodput"]["goodput"]
    with open(os.path.join(workdir, provenance.PROVENANCE_FILE)) as f:
        (attempt,) = json.load(f)["attempts"]
    attempt.pop("goodput")  # written after W&B got the record
    assert config["provenance"] == attempt and summary["provenance"] == attempt


def test_resumed_run_continues_the_same_wandb_run(tiny_lm_config, wandb_sandbox) -> None:
    """The run id is kept in the workdir: a resume (step > 0) logs to the same W&B run, a fresh
    start gets a new one."""
    workdir = os.path.join(wandb_sandbox, "run")
    tiny_lm_config.wandb.mode = "offline"
    first = tracking.start(tiny_lm_config, workdir, resume_step=0)
    run_id = first.run.id
    first.close()
    resumed = tracking.start(tiny_lm_config, workdir, resume_step=6)
    assert resumed.run.id == run_id
    resumed.close()
    fresh = tracking.start(tiny_lm_config, workdir, resume_step=0)
    assert fresh.run.id != run_id
    fresh.close()


def test_online_without_credentials_fails_in_one_line(tiny_lm_config, wandb_sandbox) -> None:
    """Online mode with no key refuses before wandb is asked anything (no prompt)."""
    tiny_lm_config.wandb.mode = "online"
    with pytest.raises(tracking.TrackingError) as error:
        tracking.start(tiny_lm_config, os.path.join(wandb_sandbox, "run"), resume_step=0)
    assert "wandb login" in str(error.value) and "WANDB_API_KEY" in str(error.value)
    assert "\n" not in str(error.value)


def test_disabled_never_imports_wandb(tmp_path) -> None:
    """The default (mode 'disabled'): training's modules and tracking.start leave wandb
    unimported (in a fresh interpreter, as other tests here import it)."""
    code = (
        "import sys, train\nfrom runtime import tracking\n"
        "from configs import shakespeare_char_cpu\n"
        f"assert tracking.start(shakespeare_char_cpu.get_config(), {str(tmp_path)!r}, 0) is None\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_bad_wandb_mode_fails_in_one_line(tiny_lm_config) -> None:
    import config_validation

    tiny_lm_config.wandb.mode = "on"
    with pytest.raises(config_validation.ConfigError, match=r"config\.wandb\.mode='on': choose"):
        config_validation.validate(tiny_lm_config)
