"""scripts/gpu_check.py, the prepared GPU check: its dry run (every part on the CPU with tiny
shapes) runs through and reports every figure, so the script cannot rot before a GPU is lent; a
part that fails or overruns its limit loses only itself."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAXLAB_TOKENS_DIR=str(tmp_path / "tokens"))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_dry_run_reports_every_part(tiny_corpus, tmp_path):
    """`--dry_run`: every part ok (cuDNN's skipped on the CPU), the figures the GPU run reports
    present (the bench parts' from tools.bench's own functions), no TensorFlow imported
    anywhere, the log and JSON written."""
    out = tmp_path / "out"
    proc = _run(["--dry_run", f"--out={out}", f"--corpus={tiny_corpus}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").stat().st_size > 0
    parts = result["parts"]
    names = [name for name, _, _ in _module().PARTS]
    assert list(parts) == names
    for name, report in parts.items():
        expected = "skipped" if name == "bench_cudnn" else "ok"
        assert report["status"] == expected, (name, report.get("error"), report.get("traceback"))
        assert report["tensorflow_imported"] is False, name
        assert report["wall_s"] <= report["limit_s"]

    assert parts["env"]["versions"]["jax"] and parts["env"]["device_kind"]
    assert parts["matmul"]["best_flops_per_sec"] > 0
    exported = parts["exported"]
    assert exported["platforms"] == ["cpu", "cuda", "tpu"] and exported["passed"] is True
    assert exported["max_abs_diff_vs_exporting_machine"] <= 1e-5
    bench = parts["bench_xla"]
    assert bench["tokens_per_sec"] > 0 and bench["compile_s"] > 0
    assert bench["mfu_measured"] > 0 and bench["model_flops_per_step"] > 0
    assert bench["measured_peak_flops_per_sec"] == parts["matmul"]["best_flops_per_sec"]
    assert bench["loop_step_time_s"] > 0 and bench["seq_len"] == 64  # the real loop, timed too
    decode = parts["decode"]
    assert decode["new_tokens"] == 63 and decode["attention_impl"] == "auto"
    assert decode["batch_2"]["tokens_per_sec"] > 0 and decode["batch_2"]["bytes_per_step"] > 0
    baby = parts["baby_gpt"]
    assert [row[0] for row in baby["val_curve"]] == [10, 20]
    assert baby["final_metrics"]["step"] == 20 and baby["tokens_per_sec_median"] > 0

    summary = result["summary"]
    assert summary["exported_ran_on"] == ["cpu"] and summary["exported_passed"] is True
    assert summary["gpt2_124m_xla"]["tokens_per_sec"] == bench["tokens_per_sec"]
    assert set(summary["targets"]) == {
        "gpt2_124m_mfu_at_least_50pct_of_989",
        "baby_gpt_1.47_within_60s_wall",
    }


def test_a_failing_part_loses_only_itself(tmp_path):
    """An artifact that cannot be read fails the `exported` part (exit status 1, its error in
    the JSON) while `env` before it still reports."""
    bad = tmp_path / "bad_export"
    bad.mkdir()
    (bad / "model.stablehlo").write_bytes(b"not a serialized module")
    (bad / "export.json").write_text("{}")
    out = tmp_path / "out"
    proc = _run(["--dry_run", f"--out={out}", "--parts=env,exported", f"--exported={bad}"],
                tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["env"]["status"] == "ok"
    assert parts["exported"]["status"] == "failed" and parts["exported"]["error"]


def test_a_part_past_its_limit_is_killed(tmp_path):
    """A part still running at its limit is killed and reported as timed out."""
    gpu_check = _module()
    driver = gpu_check.Driver(str(tmp_path), budget_s=60, dry_run=True, options={})
    report = driver.run_one("bench_xla", timeout=1)
    shutil.rmtree(driver.scratch)
    assert report["status"] == "timed_out" and report["wall_s"] < 30


def test_a_part_that_needs_tensorflow_is_skipped_naming_it():
    """A TensorFlow import reached by a part is reported as a skip naming the importing file."""
    gpu_check = _module()
    try:
        exec(compile("import tensorflow_not_here_x", os.path.join(REPO, "some_module.py"), "exec"))
    except ModuleNotFoundError as e:
        e.name = "tensorflow"
        note = gpu_check._missing_module_note(e)
    assert note.startswith("skipped: needs TensorFlow (tensorflow imported by some_module.py:1")
    with pytest.raises(ModuleNotFoundError) as info:
        import ml_collections_not_here_x  # noqa: F401
    assert gpu_check._missing_module_note(info.value) is None
