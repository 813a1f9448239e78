"""Weight-only int8 quantization: accuracy of the weights, of the loss and of sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import evaluation
import experiment
import sampling
from runtime import cli, distributed
from tools import quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quantize_tensor_round_trip():
    """Per-channel symmetric int8: error at most half a step of each channel's own scale."""
    w = jax.random.normal(jax.random.key(0), (64, 4, 8)) * jnp.arange(1, 33).reshape(1, 4, 8)
    q = quantize.quantize_tensor(w, (0,))
    assert q["int8"].dtype == jnp.int8 and q["scale"].shape == (1, 4, 8)
    error = jnp.abs(q["int8"].astype(jnp.float32) * q["scale"] - w)
    assert bool(jnp.all(error <= q["scale"] / 2 + 1e-6))
    assert int(jnp.max(jnp.abs(q["int8"].astype(jnp.int32)))) == 127
    zero = quantize.quantize_tensor(jnp.zeros((3, 2)), (0,))
    np.testing.assert_array_equal(quantize.dequantize({"w": zero})["w"], 0.0)


def test_trained_gpt_loss_memory_and_sampling(trained_lm_run):
    """On a trained GPT: val loss changes by <= 0.02, matrices shrink ~4x, sampling works."""
    result, qparams = quantize.report(trained_lm_run)
    assert result["quantized_matrices"] == 6  # 1 layer: query, key, value, out, fc, proj
    assert abs(result["loss_change"]) <= 0.02, result
    assert result["int8_param_bytes"] < result["float_param_bytes"]
    # The float loss is training's own (the run's compiled eval step, evaluation.evaluate).
    with open(os.path.join(trained_lm_run, "final_metrics.json")) as f:
        assert result["float_loss"] == pytest.approx(json.load(f)["val_loss"], rel=1e-6)
    restored = experiment.restore_run(trained_lm_run, load_data=True)
    params = distributed.to_host(restored.params)
    # Parameters from the host take the restored ones' place with their shardings and dtypes;
    # the int8 loss is the same eval step's on the dequantized weights.
    targets = jax.tree.leaves(restored.run.abstract_state.params)
    for host_params, expected in [(params, result["float_loss"]), (qparams, result["int8_loss"])]:
        state = quantize.with_params(restored, host_params)
        for leaf, target in zip(jax.tree.leaves(state.params), targets, strict=True):
            assert leaf.sharding == target.sharding and leaf.dtype == target.dtype
        batches = restored.run.datasets.eval_batches("val")
        loss = evaluation.evaluate(restored.run, state, batches)["loss"]
        assert loss == pytest.approx(expected, rel=1e-6)
    block = params["h_0"]
    q_block = qparams["h_0"]
    assert q_block["mlp"]["fc"]["kernel"]["int8"].dtype == jnp.int8
    matrix_bytes = sum(
        np.asarray(block[m][n]["kernel"]).nbytes
        for m, n in [("attn", "query"), ("attn", "key"), ("attn", "value"), ("attn", "out"),
                     ("mlp", "fc"), ("mlp", "proj")]
    )  # fmt: skip
    assert result["bytes_saved"] > 0.7 * matrix_bytes
    # Embeddings stay float.
    assert qparams["wte"]["embedding"].dtype == jnp.float32

    # Sampling with the int8 weights (dequantized) continues as the float weights do.
    model = restored.model
    prompt = jnp.zeros((2, 3), jnp.int32)
    greedy = dict(max_new_tokens=8, temperature=0.0)
    ref = sampling.generate(model, params, prompt, jax.random.key(0), **greedy)
    out = sampling.generate(
        model, quantize.dequantize(qparams), prompt, jax.random.key(0), **greedy
    )
    assert out.shape == ref.shape == (2, 11)
    assert float(jnp.mean(out == ref)) > 0.7  # greedy continuations nearly always agree


def test_non_gpt_run_is_a_user_error(trained_mlp_run):
    """A classifier's workdir: a UserError naming what to give instead (one ERROR line)."""
    with pytest.raises(cli.UserError, match="config.model.name='gpt'"):
        quantize.report(trained_mlp_run)


def test_cli_prints_json(trained_lm_run, tmp_path):
    """`python -m tools.quantize --workdir` from the repo root prints the comparison and can save
    the int8 parameters."""
    out = tmp_path / "q.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.quantize", f"--workdir={trained_lm_run}", f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"float_loss", "int8_loss", "loss_change", "bytes_saved"} <= set(result)
    saved = np.load(out)
    assert any(k.endswith("kernel/int8") and saved[k].dtype == np.int8 for k in saved.files)
