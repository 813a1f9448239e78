"""Sharded training over a device mesh and pmap: same numbers as one device, shards as promised.

The multi-device cases run in subprocesses with 8 simulated CPU devices (tests/sharded_driver.py,
several cases per subprocess); the single-device baselines run in this process (1 device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
for _path in (REPO, TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import sharded_driver  # noqa: E402
from sharded_driver import ATOL, RTOL  # noqa: E402

ONE_DEVICE = {"mesh_shape": {"data": 1, "fsdp": 1, "tensor": 1}}
MESHES: dict[str, dict[str, Any]] = {
    "data8": {"mesh_shape": {"data": 8, "fsdp": 1, "tensor": 1}},
    "fsdp8": {"mesh_shape": {"data": 1, "fsdp": 8, "tensor": 1}},
    "tensor8": {"mesh_shape": {"data": 1, "fsdp": 1, "tensor": 8}},
    "data2_tensor4": {"mesh_shape": {"data": 2, "fsdp": 1, "tensor": 4}},
    "pmap": {"parallelism": "pmap", "mesh_shape": {"data": -1, "fsdp": 1, "tensor": 1}},
    # Gradient accumulation on the mesh (MLP only, to save time): 4 microbatches of 8 examples,
    # each spread over the 8 devices.
    "fsdp8_accum4": {"mesh_shape": {"data": 1, "fsdp": 8, "tensor": 1}, "grad_accum_steps": 4},
}


# Per-device shard shapes the default rules promise (embed -> fsdp; mlp, heads, vocab -> tensor;
# an axis that a mesh axis does not divide stays whole).
EXPECTED_SHARDS: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {
    # MLP 784-64-32-10: kernels alternate (embed, mlp) and (mlp, embed); after an even number of
    # hidden layers the head is (embed, classes).
    ("mlp", "fsdp8"): {
        "dense_0/kernel": (98, 64),
        "dense_1/kernel": (64, 4),
        "head/kernel": (4, 10),
    },
    ("mlp", "tensor8"): {
        "dense_0/kernel": (784, 8),
        "dense_0/bias": (8,),
        "dense_1/kernel": (8, 32),
        "head/kernel": (32, 10),
    },
    ("mlp", "data2_tensor4"): {"dense_0/kernel": (784, 16), "head/bias": (10,)},
    # CNN: the conv kernel (3, 3, 1, 8) is (conv_h, conv_w, embed, mlp): 1 input channel stays
    # whole; dense_0 takes the 13 * 13 * 8 = 1352 pooled features.
    ("cnn", "fsdp8"): {"conv_0_0/kernel": (3, 3, 1, 8), "dense_0/kernel": (169, 32)},
    ("cnn", "tensor8"): {
        "conv_0_0/kernel": (3, 3, 1, 1),
        "dense_0/kernel": (1352, 4),
        "head/kernel": (4, 10),
    },
    # GPT: vocab 32, embed 64, 8 heads of 8, mlp 256, block 16, one layer.
    ("gpt", "fsdp8"): {
        "wte/embedding": (32, 8),
        "wpe": (16, 8),
        "h_0/attn/query/kernel": (8, 8, 8),
        "h_0/attn/out/kernel": (8, 8, 8),
        "h_0/mlp/fc/kernel": (8, 256),
        "h_0/mlp/proj/kernel": (256, 8),
        "ln_f/scale": (8,),
    },
    ("gpt", "tensor8"): {
        "wte/embedding": (4, 64),
        "wpe": (16, 64),
        "h_0/attn/query/kernel": (64, 1, 8),
        "h_0/attn/query/bias": (1, 8),
        "h_0/attn/out/kernel": (1, 8, 64),
        "h_0/mlp/fc/kernel": (64, 32),
        "h_0/mlp/proj/kernel": (32, 64),
        "ln_f/scale": (64,),
    },
    ("gpt", "data2_tensor4"): {"wte/embedding": (8, 64), "h_0/mlp/fc/kernel": (64, 64)},
}


def run_driver(cases: list[dict[str, Any]], devices: int = 8, timeout: float = 600) -> Any:
    """Starts tests/sharded_driver.py on `devices` simulated CPU devices; returns a function that
    waits for it and returns {case name: result}."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(TESTS_DIR, "sharded_driver.py"), json.dumps(cases)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def wait() -> dict[str, dict[str, Any]]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"sharded_driver timed out after {timeout}s:\n{err[-4000:]}")
        results = {}
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
                results[result.get("name", "_header")] = result
        assert proc.returncode == 0, err[-4000:]
        assert results["_header"]["devices"] == devices
        failed = {k: v["exception"] for k, v in results.items() if "exception" in v}
        assert not failed, f"{failed}\n{err[-4000:]}"
        return results

    return wait


@pytest.fixture
def cached_images(monkeypatch: pytest.MonkeyPatch, fashion_mnist_ready: str) -> None:
    """Reads Fashion-MNIST from disk once per test process instead of once per run."""
    from data import images

    monkeypatch.setattr(images, "_load_image_split", sharded_driver.cached_image_loader())


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_sharded_training_matches_one_device(model: str, tmp_path, cached_images) -> None:
    """data=8, fsdp=8, tensor=8, data=2 x tensor=4, pmap (and, for the MLP, accumulation on the
    mesh) train the same losses and parameters as one device; and each device holds the share
    of every parameter that the logical axis rules promise."""
    import train

    corpus = sharded_driver.write_corpus(str(tmp_path / "corpus.txt")) if model == "gpt" else ""
    meshes = {k: v for k, v in MESHES.items() if "accum" not in k or model == "mlp"}
    cases = [
        {
            "kind": "train",
            "name": name,
            "model": model,
            "corpus": corpus,
            "workdir": str(tmp_path / name),
            "overrides": overrides,
        }
        for name, overrides in meshes.items()
    ]
    wait = run_driver(cases)  # the 8-device runs proceed while this process runs the baseline
    config = sharded_driver.tiny_config(model, corpus, **ONE_DEVICE)
    train.train_and_evaluate(config, str(tmp_path / "one"))
    results = wait()
    for name in meshes:
        sharded_driver.assert_same_run(
            str(tmp_path / name), str(tmp_path / "one"), f"{model} {name}"
        )
    # The shards of the state each run created (train_state.create_train_state, jit with
    # out_shardings): arr.addressable_shards[0].data.shape on the first device.
    for (shard_model, mesh), expected in EXPECTED_SHARDS.items():
        if shard_model != model:
            continue
        params = results[mesh]["params"]
        for name, shard in expected.items():
            assert tuple(params[name]["shard"]) == shard, (model, mesh, name, params[name])


def test_evaluate_keeps_an_fsdp_run_sharded(tmp_path, fashion_mnist_ready) -> None:
    """evaluate.py on a run trained with fsdp=8, on 8 devices: the run is restored onto its own
    mesh (each device holds an eighth of every fsdp-sharded parameter, never the whole model)
    and evaluated by the compiled steps; the report equals training's final evaluation, and
    the same checkpoint restored onto one device gives the same metrics."""
    workdir = str(tmp_path / "fsdp8")
    fsdp8 = {"mesh_shape": {"data": 1, "fsdp": 8, "tensor": 1}}
    cases = [
        {"kind": "train", "name": "train", "model": "mlp", "workdir": workdir,
         "overrides": fsdp8},
        {"kind": "evaluate", "name": "evaluate", "workdir": workdir,
         "output": str(tmp_path / "report.json")},
    ]  # fmt: skip
    results = run_driver(cases)()
    evaluated, final = results["evaluate"], results["train"]["final"]
    assert evaluated["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1, "expert": 1}
    kernel = evaluated["params"]["dense_0/kernel"]
    assert kernel["shape"] == [784, 64] and kernel["shard"] == [98, 64], kernel
    report, single = evaluated["report"], evaluated["one_device"]
    assert report["num_examples"] == single["num_examples"] == 10_000
    assert report["accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert single["accuracy"] == pytest.approx(report["accuracy"], abs=2e-4)
    assert single["loss"] == pytest.approx(report["loss"], rel=1e-4)


def test_impossible_mesh_or_batch_fails_before_compiling(tmp_path) -> None:
    """A mesh that does not fit the 8 devices and batches that do not divide over the
    data-parallel devices are refused with a ConfigError giving the numbers, before any XLA
    compilation."""
    cases = [
        {
            "kind": "config_error",
            "name": "mesh too big",
            "model": "mlp",
            "workdir": str(tmp_path / "mesh"),
            "overrides": {"mesh_shape": {"data": 4, "fsdp": 1, "tensor": 4}},
        },
        {
            "kind": "config_error",
            "name": "batch does not divide",
            "model": "mlp",
            "workdir": str(tmp_path / "batch"),
            "overrides": {"mesh_shape": {"data": 2, "fsdp": 2, "tensor": 2}, "batch_size": 6},
        },
        {
            "kind": "config_error",
            "name": "microbatch does not divide",
            "model": "mlp",
            "workdir": str(tmp_path / "micro"),
            "overrides": {"mesh_shape": {"data": -1}, "batch_size": 32, "grad_accum_steps": 8},
        },
    ]
    results = run_driver(cases)()
    mesh, batch = results["mesh too big"], results["batch does not divide"]
    micro = results["microbatch does not divide"]
    for result in (mesh, batch, micro):
        assert result["error"] == "ConfigError", result
        assert result["compile_events"] == 0, result
    assert "needs 16 devices but 8 are present" in mesh["message"], mesh["message"]
    assert "6 examples" in batch["message"] and "4 data-parallel devices" in batch["message"]
    assert "multiple of 4" in batch["message"], batch["message"]
    assert "4 examples" in micro["message"] and "8 data-parallel devices" in micro["message"]
    assert "multiple of 64" in micro["message"], micro["message"]


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_grad_accumulation_equals_whole_batch(model: str) -> None:
    """One step on 4 microbatches of 8 == one step on the batch of 32 (loss, gradient, params)."""
    import jax

    import experiment

    config = sharded_driver.tiny_config(model, dataset="synthetic", **ONE_DEVICE)
    results = {}
    for k in (1, 4):
        config.grad_accum_steps = k
        run = experiment.build_run(config)
        batch = next(run.datasets.train_batches())  # the same batch of 32 for both runs
        state = run.init_state()  # outside the mesh context: jit's out_shardings place it
        with run.compiled.context():
            new_state, metrics = run.compiled.train_step(state, run.compiled.put_train_batch(batch))
        results[k] = jax.device_get((metrics, new_state.params))
    (m1, p1), (m4, p4) = results[1], results[4]
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=RTOL, atol=ATOL, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), p4, p1)
