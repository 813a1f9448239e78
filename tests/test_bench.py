"""tools/bench.py: runs on tiny configs and reports every field (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_FIELDS = (
    "compile_s", "step_time_median_s", "step_time_pipelined_s", "examples_per_sec",
    "model_flops_per_step", "traced_matmul_flops_per_step", "xla_flops_per_step",
    "achieved_flops_per_sec", "peak_flops_per_sec", "mfu", "peak_device_memory_bytes",
    "input_wait_fraction", "loop_step_time_s", "next_batch_s_per_step", "input_cpu_s_per_step",
)  # fmt: skip


def test_cli_prints_table_and_json_line(tiny_corpus):
    """`python -m tools.bench` from the repo root, as the README shows, on a tiny GPT with
    decoding: a readable table, then one JSON line."""
    args = [
        sys.executable, "-m", "tools.bench", "--config=configs/shakespeare_char_cpu.py",
        f"--config.dataset={tiny_corpus}", "--config.model.num_layers=1",
        "--config.model.num_heads=2", "--config.model.embed_dim=32",
        "--config.model.block_size=16", "--config.batch_size=4", "--steps=1", "--warmup=1",
        "--rounds=1", "--decode", "--decode_batch=1", "--decode_batch=2",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for field in TRAIN_FIELDS + ("tokens_per_sec", "decode_b1_tokens_per_sec",
                                 "decode_b2_tokens_per_sec"):  # fmt: skip
        assert field in result, field
    assert result["decode_new_tokens"] == 15
    assert result["decode_b2_bytes_per_step"] > result["decode_b1_bytes_per_step"]
    assert "decode_b1_bandwidth_share" not in result  # no HBM figure for a CPU
    assert result["platform"] == "cpu" and result["peak_source"].startswith("measured")
    assert any(line.startswith("tokens_per_sec") for line in lines[:-1])  # the table
    # The analytic count and the traced matmuls agree; XLA counts a little more (elementwise).
    assert result["traced_matmul_flops_per_step"] == pytest.approx(
        result["model_flops_per_step"], rel=0.25
    )
    assert result["xla_flops_per_step"] > 0.5 * result["model_flops_per_step"]
    assert 0 <= result["input_wait_fraction"] <= 1


def test_cli_errors_are_one_line():
    """Asking for something that cannot run: one ERROR line naming the fix, exit status 1."""
    args = [sys.executable, "-m", "tools.bench", "--config=configs/fashion_mnist_mlp.py",
            "--notrain", "--decode"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: --decode needs a language")
    assert "Traceback" not in proc.stderr


def test_analytic_flops_come_from_the_model_file(tiny_lm_config):
    """The GPT's FLOPs are models/gpt.py's training_flops_per_token (6N + 12LHQT per token)."""
    import models
    from models import gpt

    config = tiny_lm_config
    config.model.vocab_size = 40
    model = models.build_model(config)
    example = np.zeros((1, config.model.block_size), np.int32)
    flops = bench.model_flops_per_step(config, model, example)
    seq = config.model.block_size
    assert flops["model_flops_per_step"] == (
        gpt.training_flops_per_token(model, seq) * seq * config.batch_size
    )
    assert flops["traced_matmul_flops_per_step"] == pytest.approx(
        flops["model_flops_per_step"], rel=0.25
    )


def test_classifier_flops_are_counted_matmuls(tiny_mlp_config):
    """For the MLP, model FLOPs are 3 x 2 x the multiply-adds of its dense layers."""
    config = tiny_mlp_config
    config.model.features = (32,)
    result = bench.benchmark_training(config, steps=2, warmup=1)
    macs = 784 * 32 + 32 * 10
    assert result["model_flops_per_step"] == 3 * 2 * macs * config.batch_size
    # XLA counts less: the first layer needs no input gradient (2x, not 3x, its forward).
    assert 0.5 * result["model_flops_per_step"] < result["xla_flops_per_step"]
    assert "tokens_per_sec" not in result
    for field in TRAIN_FIELDS:
        assert field in result, field


def test_synthetic_run_with_a_measured_peak_and_progress(tiny_lm_config):
    """On synthetic tokens (no corpus), with a peak the caller measured: the figures after
    compilation reach `progress` first, and MFU is also reported against that peak."""
    config = tiny_lm_config
    config.dataset = "synthetic"
    config.model.vocab_size = 40
    seen = []
    result = bench.benchmark_training(config, steps=2, warmup=1, rounds=1,
                                      measured_peak_flops=1e12, progress=seen.append)  # fmt: skip
    assert [sorted(figures) for figures in seen] == [["compile_s", "num_params"]]
    assert seen[0]["compile_s"] == result["compile_s"] > 0
    assert result["num_params"] == seen[0]["num_params"] > 0
    assert result["measured_peak_flops_per_sec"] == 1e12
    assert result["mfu_measured"] == pytest.approx(result["achieved_flops_per_sec"] / 1e12)
    assert result["peak_source"] == "measured by the caller"  # on the CPU: instead of its own
    assert result["mfu_pipelined"] > 0 and result["tokens_per_sec"] > 0


def test_time_matmul_reports_first_best_and_median():
    figures = bench.time_matmul(64, jnp.bfloat16, repeats=3)
    assert figures["first_call_s"] > 0 and figures["best_s"] > 0
    assert figures["best_flops_per_sec"] == pytest.approx(2 * 64**3 / figures["best_s"])
    assert figures["best_flops_per_sec"] >= figures["median_flops_per_sec"] > 0


def test_conv_flops():
    """A 3x3 convolution's count is 2 x outputs x (kernel area x input channels)."""
    x = jnp.ones((2, 10, 10, 3))
    w = jnp.ones((3, 3, 3, 8))
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert bench.matmul_flops(conv, x, w) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)


def test_peak_flops_table():
    """Known accelerators use datasheet figures; unknown ones say so."""

    class Fake:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    assert bench.peak_flops(Fake("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert bench.peak_flops(Fake("NVIDIA A100-SXM4-40GB"))[0] == 312e12
    assert bench.peak_flops(Fake("TPU v5 lite"))[0] == 197e12
    assert bench.peak_flops(Fake("TPU v4"))[0] == 275e12
    assert bench.peak_flops(Fake("Mystery"))[0] is None
    assert bench.hbm_bandwidth(Fake("NVIDIA H100 80GB HBM3")) == 3.35e12
    assert bench.hbm_bandwidth(Fake("NVIDIA H200")) == 4.8e12
    assert bench.hbm_bandwidth(Fake("Mystery")) is None
