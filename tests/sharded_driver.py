"""Runs sharded-training cases in a process of its own (e.g. with 8 simulated CPU devices).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_driver.py '<json>'

The argument is a JSON list of cases; each result is printed as one JSON line prefixed with
`RESULT `. The tiny configs and the run comparisons live here so that tests/test_sharding.py
(which runs the single-device baselines in its own process), tests/test_multihost.py and the
subprocesses train and compare exactly the same models.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# 32 distinct characters: the char vocabulary (and so the GPT's vocab axis) divides by 8.
CORPUS_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;!\n"


def write_corpus(path: str, num_chars: int = 20_000) -> str:
    """Writes a deterministic text file using every character of CORPUS_ALPHABET; returns path."""
    rng = np.random.default_rng(0)
    chars = np.array(list(CORPUS_ALPHABET))
    text = CORPUS_ALPHABET + "".join(rng.choice(chars, num_chars))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def tiny_config(model: str, corpus: str = "", /, **overrides: Any) -> ml_collections.ConfigDict:
    """A few-step, dropout-free config of `model` ('mlp', 'cnn' or 'gpt'); overrides applied last.

    Nested groups (mesh_shape, model) are given as dicts and update only the fields they name
    (positional-only arguments: `model={...}` is such an override).
    """
    from configs import fashion_mnist_cnn, fashion_mnist_mlp, shakespeare_char

    if model == "mlp":
        c = fashion_mnist_mlp.get_config()
        c.model.features = (64, 32)
    elif model == "cnn":
        c = fashion_mnist_cnn.get_config()
        c.model.conv_features = (8,)
        c.model.dense_features = (32,)
        c.augment.random_flip = False
    elif model == "gpt":
        c = shakespeare_char.get_config()
        c.dataset = corpus
        # One layer (compiling is what costs here); 8 heads of 8 and 32 characters: every
        # sharded axis divides by 8.
        c.model.update(
            {
                "vocab_size": len(CORPUS_ALPHABET),
                "block_size": 16,
                "num_layers": 1,
                "num_heads": 8,
                "embed_dim": 64,
                "use_bias": True,
            }
        )
        c.model.dropout_rate = 0.0
        c.eval_steps = 1
        c.sample_every_eval = False  # generation is tested elsewhere; here it only costs compiles
        c.eval_batch_size = 16
    else:
        raise ValueError(f"unknown model {model!r}")
    c.num_train_steps = 3
    c.batch_size = 32
    c.warmup_steps = 0
    # SGD, not Adam: Adam's update is invariant to the gradient's scale (a psum where a pmean
    # belongs would go unnoticed) and turns round-off in near-zero gradients into steps of lr.
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.log_every_steps = 1
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 10_000
    c.async_checkpointing = False
    if model != "gpt":
        c.eval_batch_size = 1000
    for key, value in overrides.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = tuple(value) if isinstance(value, list) else value
    return c


_LOAD_IMAGE_SPLIT = None


def cached_image_loader() -> Any:
    """images._load_image_split memoised: the test runs read Fashion-MNIST once per
    process instead of once per run (the arrays are never modified)."""
    global _LOAD_IMAGE_SPLIT
    if _LOAD_IMAGE_SPLIT is None:
        from data import images

        _LOAD_IMAGE_SPLIT = functools.lru_cache(maxsize=4)(images._load_image_split)
    return _LOAD_IMAGE_SPLIT


# Float32 agreement between layouts: the sharded programs add the same numbers in another order
# (per-device partial sums, then an all-reduce), so results differ by a few ulps per step.
RTOL, ATOL = 1e-5, 1e-6


def train_losses(workdir: str) -> np.ndarray:
    """The per-step training losses a run logged to metrics.jsonl (log_every_steps=1)."""
    from runtime import metrics_writer

    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The final checkpoint's parameters as host arrays, flattened to 'path/to/leaf'."""
    from flax import traverse_util

    import checkpointing

    state, _ = checkpointing.read_state_as_numpy(workdir)
    return traverse_util.flatten_dict(state["params"], sep="/")


def assert_same_run(workdir: str, reference: str, label: str) -> None:
    """Same losses at every step and same final parameters as the reference run."""
    expected, got = train_losses(reference), train_losses(workdir)
    assert len(expected) == len(got) > 0, (label, expected, got)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"{label}: losses")
    want, have = final_params(reference), final_params(workdir)
    assert sorted(want) == sorted(have), label
    for name in want:
        np.testing.assert_allclose(
            have[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{label}: {name}"
        )


def shard_shapes(params: Any) -> dict[str, dict[str, Any]]:
    """{'path/to/leaf': global shape, first device's shard shape, spec} of a params tree."""
    import jax

    return {
        "/".join(str(getattr(k, "key", k)) for k in path): {
            "shape": list(arr.shape),
            "shard": list(arr.addressable_shards[0].data.shape),
            "spec": str(arr.sharding.spec),
        }
        for path, arr in jax.tree_util.tree_leaves_with_path(params)
    }


def _train(case: dict[str, Any]) -> dict[str, Any]:
    """Trains through train.train_and_evaluate into case['workdir']; also reports how the
    parameters that the run created with train_state.create_train_state were sharded."""
    import train
    import train_state

    created = {}
    create = train_state.create_train_state

    def recording_create(*args: Any, **kwargs: Any) -> Any:
        state = create(*args, **kwargs)
        created.update(shard_shapes(state.params))  # before the first step donates the buffers
        return state

    config = tiny_config(case["model"], case.get("corpus", ""), **case.get("overrides", {}))
    train_state.create_train_state = recording_create
    try:
        final = train.train_and_evaluate(config, case["workdir"])
    finally:
        train_state.create_train_state = create
    scalars = {k: v for k, v in final.items() if isinstance(v, int | float | str)}
    return {"final": scalars, "params": created}


def _config_error(case: dict[str, Any]) -> dict[str, Any]:
    """Starts a run that should be refused; reports the ConfigError and how many XLA compilations
    (and so how much device work) happened before it."""
    import jax

    import config_validation
    import train

    compiles = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    config = tiny_config(case["model"], case.get("corpus", ""), **case.get("overrides", {}))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train.train_and_evaluate(config, case["workdir"])
    except config_validation.ConfigError as e:
        return {"error": "ConfigError", "message": str(e), "compile_events": len(compiles)}
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {"error": None, "compile_events": len(compiles)}


def _evaluate(case: dict[str, Any]) -> dict[str, Any]:
    """Evaluates case['workdir'] with evaluate.py's function on all devices (the run's own mesh),
    and again restored onto the first device alone; reports both reports and how the restored
    parameters were sharded."""
    import jax

    import evaluate
    import experiment

    report = evaluate.evaluate_checkpoint(case["workdir"], output=case["output"])
    restored = experiment.restore_run(case["workdir"])
    one_device = experiment.restore_run(case["workdir"], devices=jax.devices()[:1])
    single = evaluate.evaluate_restored(one_device, report["split"])
    scalars = {k: v for k, v in report.items() if isinstance(v, int | float)}
    return {
        "report": scalars,
        "one_device": {k: v for k, v in single.items() if isinstance(v, int | float)},
        "mesh": dict(restored.run.mesh.shape),
        "params": shard_shapes(restored.params),
    }


KINDS = {"train": _train, "config_error": _config_error, "evaluate": _evaluate}


def main(argv: list[str]) -> int:
    """Runs every case of the JSON list argv[1], printing one RESULT line per case."""

    from data import images

    images._load_image_split = cached_image_loader()
    return run_cases(json.loads(argv[1]), KINDS)


def run_cases(cases: list[dict[str, Any]], kinds: dict[str, Any]) -> int:
    """Runs each case by its kind, printing the device count and then one RESULT line per case
    (a case that raises reports its exception: one failing variant must not hide the others)."""
    import jax

    print("RESULT " + json.dumps({"devices": jax.device_count()}), flush=True)
    for case in cases:
        try:
            result = kinds[case["kind"]](case)
        except Exception as e:
            import traceback

            traceback.print_exc()
            result = {"exception": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps({"name": case["name"], **result}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv))
