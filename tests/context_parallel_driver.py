"""Runs context-parallel cases in a process of its own, with 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/context_parallel_driver.py '<json>'

The argument is a JSON list of cases; each result is printed as one JSON line prefixed with
`RESULT ` (as tests/sharded_driver.py, whose 'train', 'evaluate' and 'config_error' kinds this
driver also runs). Its own kind, 'compare', runs a GPT's forward pass and gradient on a mesh
with a context axis and reports how far its logits, loss and gradients are from a reference:
the same model on one device (no mesh), or on the same mesh with the other strategy.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
for _path in (REPO, TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import sharded_driver  # noqa: E402

# 4 heads of 8 (2 key/value heads for grouped-query attention), vocabulary 32, sequences of 32:
# every axis that data, fsdp or tensor (2) split divides, and 32 = 2 x 8 chunks for context=8.
MODEL = dict(vocab_size=32, block_size=32, num_layers=2, num_heads=4, embed_dim=32)
FEATURES = {
    # Rotary positions, grouped-query attention, QK-norm, soft-capping, scanned layers, remat.
    "rope_gqa": dict(position_embedding="rope", num_kv_heads=2, qk_norm=True,
                     attn_logit_softcap=30.0, scan_layers=True, remat_policy="full"),
    # Learned positions, multi-head attention, unrolled layers, remat of everything but dots.
    "learned": dict(position_embedding="learned", remat_policy="dots_saveable"),
    "dropout": dict(position_embedding="rope", dropout_rate=0.1),
}  # fmt: skip
BATCH = 4
KV_BLOCK = 512  # models.context_parallel.KV_BLOCK's value (the cases here fit in one block)
_ONE_DEVICE: dict[tuple[str, bool], Any] = {}  # one device's results, per model and inputs


def packed_arrays(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Segment ids and per-document positions of `batch` rows of documents of random lengths
    (int32 [batch, length]): what data/text_windows.py gives with config.packing."""
    rng = np.random.default_rng(seed)
    starts = rng.random((batch, length)) < 0.15
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    index = np.arange(length)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {"segment_ids": segment_ids, "positions": (index - first).astype(np.int32)}


def _compare(case: dict[str, Any]) -> dict[str, Any]:
    """Logits, loss and gradients of the GPT `case['features']` on `case['mesh']` with
    context_parallel=case['strategy'], against case['reference']: 'one_device' or the other
    strategy on the same mesh; reports the largest absolute differences and magnitudes."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import linen as nn

    import sharding
    import steps
    from models import context_parallel
    from models.gpt import GPT

    # A device's keys in blocks of kv_block (the online softmax's inner loop), if the case asks.
    context_parallel.KV_BLOCK = case.get("kv_block", KV_BLOCK)
    kwargs = {**MODEL, **FEATURES[case["features"]]}
    train = kwargs.get("dropout_rate", 0.0) > 0
    tokens = jax.random.randint(jax.random.key(1), (BATCH, MODEL["block_size"]), 0, 32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)}
    if case.get("packed"):
        batch.update({k: jnp.asarray(v) for k, v in packed_arrays(*tokens.shape).items()})
        batch["weights"] = (batch["segment_ids"] == jnp.roll(batch["segment_ids"], -1, 1)) * 1.0

    def run(strategy: str, mesh: Any) -> Any:
        model = GPT(**kwargs, context_parallel=strategy)

        def loss_fn(params: Any) -> Any:
            logits = model.apply(
                {"params": params}, batch["inputs"], train=train,
                rngs={"dropout": jax.random.key(3)}, **steps.packed_inputs(batch),
            )  # fmt: skip
            total, _, count = steps.cross_entropy(logits, batch["targets"], batch.get("weights"))
            return total / count, logits

        params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        if mesh is None:
            (loss, logits), grads = step(params)
        else:
            config = ml_collections.ConfigDict({"logical_axis_rules": ()})
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(config)):
                (loss, logits), grads = step(params)
        return jax.device_get((logits, loss, grads))

    shape = ml_collections.ConfigDict({"mesh_shape": case["mesh"]})
    mesh = sharding.make_mesh(shape)
    got = run(case["strategy"], mesh)
    if case.get("reference", "one_device") == "one_device":
        key = (case["features"], bool(case.get("packed")))
        if key not in _ONE_DEVICE:  # the strategy does not matter without a mesh
            _ONE_DEVICE[key] = run(case["strategy"], None)
        want = _ONE_DEVICE[key]
    else:
        want = run(case["reference"], mesh)
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = want
    grad_diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
    )
    return {
        "logits": float(np.max(np.abs(logits - ref_logits))),
        "loss": float(abs(loss - ref_loss)),
        "grads": grad_diff,
        "loss_value": float(ref_loss),
        "grad_scale": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads)),
        "finite": bool(np.isfinite(loss))
        and all(bool(np.isfinite(g).all()) for g in jax.tree.leaves(grads)),
    }


KINDS = {**sharded_driver.KINDS, "compare": _compare}


def main(argv: list[str]) -> int:
    """Runs every case of the JSON list argv[1], printing one RESULT line per case."""
    return sharded_driver.run_cases(json.loads(argv[1]), KINDS)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv))
