"""Context parallelism (models/context_parallel.py): sequences split over the `context` mesh axis
give one device's logits, losses and gradients with either strategy ('all_gather', 'ring') on
8 simulated CPU devices, a run trained so restores onto one device and evaluates the same, and
what cannot be split is refused before anything compiles.

The 8-device cases run in one subprocess (tests/context_parallel_driver.py), started once for
this module; the single-device baseline of the training run runs in this process meanwhile.
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

from models import context_parallel  # noqa: E402

MESHES = {
    "context4_data2": {"data": 2, "fsdp": 1, "context": 4, "tensor": 1},
    "context2_fsdp2_tensor2": {"data": 1, "fsdp": 2, "context": 2, "tensor": 2},
    "context8": {"data": 1, "fsdp": 1, "context": 8, "tensor": 1},
}
STRATEGIES = context_parallel.STRATEGIES
CP_RUN = {"mesh_shape": {"data": 2, "fsdp": 1, "context": 4, "tensor": 1},
          "model": {"context_parallel": "ring"}}  # fmt: skip
ONE_DEVICE = {"mesh_shape": {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}}
# Float32 agreement: the split programs add the same numbers in another order (the online
# softmax merges blocks, gradients are reduced over devices), a few ulps per operation.
TOL = 2e-5


def _compare_cases() -> list[dict[str, Any]]:
    cases = [
        {"kind": "compare", "name": f"rope_gqa/{mesh}/{strategy}", "features": "rope_gqa",
         "mesh": shape, "strategy": strategy}
        for mesh, shape in MESHES.items() for strategy in STRATEGIES
    ]  # fmt: skip
    cases += [
        {"kind": "compare", "name": f"learned_packed/{strategy}", "features": "learned",
         "packed": True, "mesh": MESHES["context4_data2"], "strategy": strategy}
        for strategy in STRATEGIES
    ]  # fmt: skip
    # A device's keys in blocks of 4 (KV_BLOCK's inner loop, which the long sequences use).
    cases.append(
        {
            "kind": "compare",
            "name": "rope_gqa/kv_block4/ring",
            "features": "rope_gqa",
            "mesh": MESHES["context4_data2"],
            "strategy": "ring",
            "kv_block": 4,
        }
    )
    # Dropout draws its masks in the layout's order (not one device's), the same for both
    # strategies: ring against all-gather, training mode.
    cases.append(
        {
            "kind": "compare",
            "name": "dropout/ring_vs_all_gather",
            "features": "dropout",
            "mesh": MESHES["context8"],
            "strategy": "ring",
            "reference": "all_gather",
        }
    )
    return cases


def _refused(tmp: str) -> list[dict[str, Any]]:
    context4 = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    overrides = {
        "block_size": {"mesh_shape": context4, "model": {"block_size": 12}},
        "pmap": {"mesh_shape": context4, "parallelism": "pmap"},
        "cudnn": {"mesh_shape": context4, "model": {"attention_impl": "cudnn"}},
    }
    cases = [{"kind": "config_error", "name": f"refused/{name}", "model": "gpt",
              "corpus": os.path.join(tmp, "corpus.txt"), "workdir": os.path.join(tmp, name),
              "overrides": o} for name, o in overrides.items()]  # fmt: skip
    cases.append(
        {
            "kind": "config_error",
            "name": "refused/mlp",
            "model": "mlp",
            "workdir": os.path.join(tmp, "mlp"),
            "overrides": {"mesh_shape": context4},
        }
    )
    return cases


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Starts every 8-device case in one subprocess, trains the one-device baseline run here
    meanwhile, and returns {'results': {case name: result}, 'tmp': the cases' directory}."""
    import train

    tmp = str(tmp_path_factory.mktemp("context_parallel"))
    corpus = sharded_driver.write_corpus(os.path.join(tmp, "corpus.txt"))
    run = {"model": "gpt", "corpus": corpus, "workdir": os.path.join(tmp, "cp_run")}
    cases = _compare_cases() + _refused(tmp) + [
        {"kind": "train", "name": "train", **run, "overrides": CP_RUN},
        {"kind": "evaluate", "name": "evaluate", "workdir": run["workdir"],
         "output": os.path.join(tmp, "report.json")},
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(TESTS_DIR, "context_parallel_driver.py"), json.dumps(cases)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    config = sharded_driver.tiny_config("gpt", corpus, **ONE_DEVICE)
    train.train_and_evaluate(config, os.path.join(tmp, "one"))
    try:
        out, err = proc.communicate(timeout=2400)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"context_parallel_driver timed out:\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    results = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result.get("name", "_header")] = result
    assert results["_header"]["devices"] == 8
    failed = {k: v["exception"] for k, v in results.items() if "exception" in v}
    assert not failed, f"{failed}\n{err[-4000:]}"
    return {"results": results, "tmp": tmp}


def test_balanced_order_gives_each_device_a_chunk_from_each_end() -> None:
    """Length 16 over 4 devices: 8 chunks of 2, device i holds chunks i and 7 - i; the order
    is a permutation and each device's slice is in sequence order (so its own keys' causal
    mask is the lower triangle)."""
    order = context_parallel.balanced_order(16, 4)
    devices = order.reshape(4, 4)
    assert devices.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert sorted(order.tolist()) == list(range(16))
    assert all((np.diff(d) > 0).all() for d in devices)
    # Causal work per device (pairs of query and earlier-or-same key): equal for every device.
    work = [sum(int(q) + 1 for q in d) for d in devices]
    assert len(set(work)) == 1, work


def test_blockwise_online_softmax_equals_plain_attention() -> None:
    """The online softmax over keys in blocks of 4 (as a device's chunk is cut into KV_BLOCK
    keys), with grouped-query heads, soft-capping and a causal, block-diagonal mask: plain
    attention's output and gradients."""
    import jax
    import jax.numpy as jnp

    from models.attention import plain_attention

    q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, 16, 2, 8))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], 4, axis=1))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None] & (segments[:, :, None] == segments[:, None])

    def blockwise(q, k, v, block):
        shape = (2, 2, 2, 16)
        state = (jnp.zeros(shape + (8,)), jnp.full(shape, context_parallel._NEG), jnp.zeros(shape))
        state = context_parallel._merge(state, q, k, v, mask[:, None, None], 30.0, block)
        return context_parallel._finish(state, q.dtype)

    want = plain_attention(q, k, v, mask[:, None], 30.0)
    for block in (4, 16):
        np.testing.assert_allclose(blockwise(q, k, v, block), want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(blockwise(*a, 4))), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jnp.sin(plain_attention(*a, mask[:, None], 30.0))),
                   argnums=(0, 1, 2))(q, k, v)  # fmt: skip
    for got, expected in zip(grads, ref, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_sequences_give_one_devices_numbers(driver, mesh: str, strategy: str) -> None:
    """Rotary positions, grouped-query attention, QK-norm, soft-capping, scan_layers and full
    remat: logits, loss and every gradient on context=4 x data=2, context=2 x fsdp=2 x
    tensor=2 and context=8 equal one device's."""
    result = driver["results"][f"rope_gqa/{mesh}/{strategy}"]
    assert result["finite"], result
    assert result["logits"] < TOL and result["loss"] < TOL, result
    assert result["grads"] < TOL * max(1.0, result["grad_scale"]), result


def test_keys_in_blocks_give_the_same_numbers(driver) -> None:
    """Ring attention with each device's keys taken 4 at a time (the online softmax's inner
    loop; KV_BLOCK keys on long sequences): one device's numbers on context=4 x data=2."""
    result = driver["results"]["rope_gqa/kv_block4/ring"]
    assert result["logits"] < TOL and result["loss"] < TOL, result
    assert result["grads"] < TOL * max(1.0, result["grad_scale"]), result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_documents_with_learned_positions_split_the_same(driver, strategy: str) -> None:
    """Packed documents (segment ids, per-document positions, boundary targets unweighted),
    learned positions, multi-head attention and dots-saveable remat on context=4 x data=2:
    one device's numbers."""
    result = driver["results"][f"learned_packed/{strategy}"]
    assert result["logits"] < TOL and result["loss"] < TOL, result
    assert result["grads"] < TOL * max(1.0, result["grad_scale"]), result


def test_dropout_trains_alike_with_either_strategy(driver) -> None:
    """With dropout (training mode) on context=8 both strategies compute the same function
    (the masks are drawn in the layout's order, so they are not one device's masks)."""
    result = driver["results"]["dropout/ring_vs_all_gather"]
    assert result["finite"], result
    assert result["logits"] < TOL and result["grads"] < TOL * max(1.0, result["grad_scale"])


def test_a_context_parallel_run_restores_onto_one_device(driver) -> None:
    """A GPT trained with ring attention on context=4 x data=2 trains the losses and
    parameters of one device, and its checkpoint evaluates the same on its own mesh and
    restored onto one device."""
    tmp, results = driver["tmp"], driver["results"]
    sharded_driver.assert_same_run(
        os.path.join(tmp, "cp_run"), os.path.join(tmp, "one"), "context4_data2 ring"
    )
    evaluated = results["evaluate"]
    assert evaluated["mesh"]["context"] == 4, evaluated["mesh"]
    report, single = evaluated["report"], evaluated["one_device"]
    assert single["loss"] == pytest.approx(report["loss"], rel=1e-5)
    assert single["num_examples"] == report["num_examples"]


def test_what_cannot_be_split_is_refused_before_compiling(driver) -> None:
    """One ERROR line naming the field and the fix, before any XLA compilation: a block_size
    that 2 x context chunks do not divide, pmap, cuDNN's attention, a model that cannot split
    its sequences."""
    results = driver["results"]
    expected = {
        "block_size": "multiple of 8",
        "pmap": "config.parallelism='jit'",
        "cudnn": "attention_impl='cudnn'",
        "mlp": "config.mesh_shape.context=1",
    }
    for name, phrase in expected.items():
        result = results[f"refused/{name}"]
        assert result["error"] == "ConfigError", result
        assert result["compile_events"] == 0, result
        assert phrase in result["message"] and "\n" not in result["message"], result
