"""Weight-only int8 quantization of a trained GPT for sampling and evaluation.

    python -m tools.quantize --workdir=runs/shakespeare_cpu [--step=N] [--output=q.npz]

Every matrix of the transformer blocks (attention query/key/value/out, MLP fc/proj) is stored as
int8 with one float32 scale per output channel (symmetric: w ~= int8 * scale, scale = max|w| /
127 over the input axes); embeddings, norms and biases stay float32. The stored parameters are
~4x smaller; for sampling they are dequantized inside the jitted forward (`dequantize` under jit).
The CLI reports the validation loss with float and int8 weights, its change, and the bytes of
both parameter sets, as one JSON line. Both losses come from the run's own compiled, sharded eval
step (`evaluation.evaluate`, as training and evaluate.py compute it): the int8 weights,
dequantized, take the float weights' place in the restored state, with the same shardings.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

import evaluation
import experiment
import train_state
from runtime import cli, distributed, workdir_files

# Matrices that are quantized (by the last path element of the kernel's parent module) and the
# axes each one contracts with its input: scales are per output channel, over these axes.
_INPUT_AXES = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1), "fc": (0,), "proj": (0,)}


def _is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, dict) and set(leaf) == {"int8", "scale"}


def quantize_tensor(w: jax.Array, axes: tuple[int, ...]) -> dict[str, jax.Array]:
    """Symmetric per-channel int8: {'int8': round(w / scale), 'scale': max|w| / 127 over axes}."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {"int8": q, "scale": scale.astype(jnp.float32)}


def quantize_params(params: Any) -> Any:
    """The params tree with every block matrix replaced by {'int8', 'scale'}; the rest as is."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "kernel" and len(path) >= 2 and path[-2] in _INPUT_AXES:
            out[path] = quantize_tensor(leaf, _INPUT_AXES[path[-2]])
        else:
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def dequantize(qparams: Any, dtype: jnp.dtype = jnp.float32) -> Any:
    """Float params from quantized ones (call it inside jit: XLA fuses it into the forward)."""
    return jax.tree.map(
        lambda x: (x["int8"].astype(dtype) * x["scale"].astype(dtype)) if _is_quantized(x) else x,
        qparams,
        is_leaf=_is_quantized,
    )


def num_bytes(tree: Any) -> int:
    """Bytes of every array in a (quantized or float) params tree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def with_params(restored: experiment.Restored, params: Any) -> train_state.TrainState:
    """`restored.state` with `params` (a host tree, float or quantized) in place of its own:
    dequantized on the host, cast to the run's parameter dtypes and placed with the shardings of
    `restored.run.abstract_state`, so that the run's compiled steps take it unchanged.

    Raises ValueError if `params` has another tree structure than the run's parameters."""
    dense = dequantize(jax.tree.map(np.asarray, params))
    abstract = restored.run.abstract_state.params
    placed = jax.tree.map(
        lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding), abstract, dense
    )
    return restored.state.replace(params=placed)


def report(workdir: str, step: int | None = None, split: str = "val") -> tuple[dict[str, Any], Any]:
    """Quantizes a run's checkpoint; returns (the float and int8 mean per-token losses on `split`,
    their change and the parameter bytes; the quantized params, host arrays).

    Raises cli.UserError for a run that is not a GPT language model or a split that gives no
    batch, FileNotFoundError for a missing workdir, checkpoint or step."""
    config = workdir_files.load_config(workdir)  # checked before any data or checkpoint is read
    if config.task != "lm" or config.model.name != "gpt":
        raise cli.UserError(
            f"{workdir} is a {config.model.name!r} run; tools.quantize handles GPT language-model "
            "runs (config.model.name='gpt'): give the workdir of one."
        )
    restored = experiment.restore_run(workdir, step, load_data=True)
    run = restored.run
    params = distributed.to_host(restored.params)
    qparams = quantize_params(params)
    float_loss = evaluation.evaluate(run, restored.state, run.datasets.eval_batches(split))["loss"]
    int8_state = with_params(restored, qparams)
    int8_loss = evaluation.evaluate(run, int8_state, run.datasets.eval_batches(split))["loss"]
    matrices = [
        x for x in jax.tree.leaves(qparams, is_leaf=_is_quantized) if _is_quantized(x)
    ]  # fmt: skip
    return {
        "split": split,
        "float_loss": float_loss,
        "int8_loss": int8_loss,
        "loss_change": int8_loss - float_loss,
        "float_param_bytes": num_bytes(params),
        "int8_param_bytes": num_bytes(qparams),
        "bytes_saved": num_bytes(params) - num_bytes(qparams),
        "quantized_matrices": len(matrices),
    }, qparams


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: train.py also has --workdir)."""
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints and config.json.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("split", "val", "Split for the loss comparison.")
    flags.DEFINE_string("output", None, "Optional .npz to write the quantized parameters to.")
    flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    """absl entry point: prints one JSON line."""
    del argv
    result, qparams = report(FLAGS.workdir, FLAGS.step, FLAGS.split)
    if FLAGS.output:
        flat = traverse_util.flatten_dict(jax.device_get(qparams), sep="/")
        np.savez(FLAGS.output, **{k: np.asarray(v) for k, v in flat.items()})
        result["output"] = FLAGS.output
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
