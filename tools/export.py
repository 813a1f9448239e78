"""Export a trained model for serving without the training code: serialized StableHLO.

    python -m tools.export --workdir=runs/shakespeare_cpu --output=exported/ [--step=N]

Writes `model.stablehlo` (jax.export's serialized form: the forward pass with the trained
weights baked in, a symbolic batch dimension, lowered for CPU, CUDA GPUs and TPUs in one
artifact) and `export.json` (the platforms, input shape and dtype, the tokenizer files next to
it for language models). Any JAX program on any of those platforms can run it with
`load(output).call(inputs)` — no model, config or Flax code needed; the same bytes also load in
other StableHLO/PJRT runtimes. The lowering needs no accelerator: an artifact exported on a CPU
machine serves on a GPU or TPU. A GPT trained with `attention_impl='cudnn'` is exported with
XLA's attention (`'xla'`, the same function): cuDNN's fused kernel has no CPU or TPU lowering
(and needs cuDNN on the exporting host). (jax2tf's SavedModel route is
deprecated upstream in favour of jax.export, which is what it wraps today.)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import export as jax_export

import experiment
from runtime import cli, distributed

MODEL_FILE = "model.stablehlo"
META_FILE = "export.json"
# Every platform jax.export lowers for; one artifact holds a lowering for each.
PLATFORMS = ("cpu", "cuda", "tpu")


def export_forward(model: Any, variables: Any, example: np.ndarray,
                   platforms: tuple[str, ...] = PLATFORMS) -> jax_export.Exported:  # fmt: skip
    """jax.export of inputs -> float32 outputs (logits), weights as constants, batch symbolic,
    lowered for each of `platforms` (jax.export's multi-platform lowering). `variables` are
    baked in as they are: pass host arrays (distributed.to_host)."""

    def forward(inputs):
        return model.apply(variables, inputs, train=False)

    (batch,) = jax_export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch,) + tuple(example.shape[1:]), example.dtype)
    return jax_export.export(jax.jit(forward), platforms=platforms)(spec)


def export_run(workdir: str, output: str, step: int | None = None) -> dict[str, Any]:
    """Exports a run's checkpoint into `output`; returns the metadata written to export.json."""
    restored = experiment.restore_run(workdir, step)
    config, model, step = restored.config, restored.model, restored.step
    example = restored.run.input_spec.example_input
    variables = distributed.to_host(restored.variables)
    model = portable_model(model)
    exported = export_forward(model, variables, example, PLATFORMS)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, MODEL_FILE), "wb") as f:
        f.write(exported.serialize())
    meta = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "task": config.task,
        "model": config.model.name,
        "input_shape": ["batch", *example.shape[1:]],
        "input_dtype": str(example.dtype),
        "platforms": list(exported.platforms),
        **({"attention_impl": model.attention_impl} if hasattr(model, "attention_impl") else {}),
        "format": "jax.export serialized StableHLO",
    }
    if config.task == "lm":
        for name in os.listdir(workdir):  # the tokenizer files train.py saved
            if name.startswith("tokenizer"):
                shutil.copy(os.path.join(workdir, name), output)
    with open(os.path.join(output, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def portable_model(model: Any) -> Any:
    """`model` as it can be lowered for every platform: a GPT's cuDNN attention becomes XLA's
    (the same function; the cuDNN kernel lowers for CUDA alone, and only where cuDNN is)."""
    if getattr(model, "attention_impl", None) == "cudnn":
        return model.clone(attention_impl="xla")
    return model


def load(output: str) -> jax_export.Exported:
    """The exported forward pass; call it as `load(output).call(inputs)`."""
    with open(os.path.join(output, MODEL_FILE), "rb") as f:
        return jax_export.deserialize(bytearray(f.read()))


def run(output: str, inputs: np.ndarray) -> np.ndarray:
    """Runs an exported model on a batch of inputs (ints for LMs, float images otherwise)."""
    exported = load(output)
    dtype = exported.in_avals[0].dtype
    return np.asarray(exported.call(jnp.asarray(inputs, dtype)))


# A reference beside an artifact: inputs and the exporting machine's outputs (check_exported).
REFERENCE_FILE = "reference.npz"


def export_reference(directory: str) -> dict[str, Any]:
    """A tiny GPT (random weights) exported for every platform into `directory`, with inputs
    and this machine's outputs beside it (REFERENCE_FILE): made on one machine (a CPU), then
    carried to another (a GPU) for `check_exported`. Returns export.json's metadata.

    Raises AssertionError if the artifact's outputs here differ from the model's."""
    from flax import linen as nn

    from models.gpt import GPT

    model = GPT(vocab_size=65, block_size=64, num_layers=2, num_heads=4, embed_dim=128)
    example = np.zeros((1, 64), np.int32)
    variables = jax.device_get(nn.unbox(model.init(jax.random.key(0), example)))
    exported = export_forward(portable_model(model), variables, example)
    inputs = np.random.default_rng(0).integers(0, 65, (3, 64)).astype(np.int32)
    outputs = np.asarray(exported.call(inputs))
    if not np.allclose(outputs, jax.jit(model.apply)(variables, inputs), atol=1e-4):
        raise AssertionError("The exported model's outputs differ from the model's.")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(exported.serialize())
    meta = {
        "model": "gpt (2 layers, 4 heads, 128 wide, block 64, vocabulary 65; random weights)",
        "input_shape": ["batch", 64],
        "input_dtype": "int32",
        "platforms": list(exported.platforms),
        "exported_on": jax.default_backend(),
        "jax": jax.__version__,
        "format": "jax.export serialized StableHLO",
    }
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    np.savez(os.path.join(directory, REFERENCE_FILE), inputs=inputs, outputs=outputs)
    return meta


def check_exported(directory: str) -> dict[str, Any]:
    """Runs the artifact in `directory` (jax.export alone: no model code) on this machine's
    default device, on its reference inputs (else random ones of its declared shape): the
    platforms it holds, where it ran, the first and a second call's seconds, and `passed`:
    finite outputs, computed on this backend and, with a reference, within 1% (of the outputs'
    scale: float32 matmuls on a GPU may use TF32) of the exporting machine's."""
    import time

    exported = load(directory)
    with open(os.path.join(directory, META_FILE)) as f:
        meta = json.load(f)
    expected = None
    if os.path.exists(os.path.join(directory, REFERENCE_FILE)):
        reference = np.load(os.path.join(directory, REFERENCE_FILE))
        inputs, expected = reference["inputs"], reference["outputs"]
    else:
        shape = [3 if d == "batch" else int(d) for d in meta["input_shape"]]
        inputs = np.random.default_rng(0).integers(0, 2, shape).astype(meta["input_dtype"])
    args = jnp.asarray(inputs, exported.in_avals[0].dtype)
    seconds = []
    for _ in range(2):  # the first call compiles
        start = time.perf_counter()
        outputs = jax.block_until_ready(exported.call(args))
        seconds.append(time.perf_counter() - start)
    report = {
        "platforms": list(exported.platforms),
        "exported_on": meta.get("exported_on", "cpu"),
        "first_call_s": seconds[0],
        "call_s": seconds[1],
        "ran_on": sorted({d.platform for d in outputs.devices()}),
        "output_shape": list(outputs.shape),
    }
    outputs = np.asarray(outputs, np.float32)
    report["passed"] = bool(np.all(np.isfinite(outputs))) and report["ran_on"] == [
        jax.default_backend()
    ]
    if expected is not None:
        diff = float(np.max(np.abs(outputs - np.asarray(expected, np.float32))))
        report["max_abs_diff_vs_exporting_machine"] = diff
        scale = max(1.0, float(np.max(np.abs(expected))))
        report["passed"] = report["passed"] and diff <= 1e-2 * scale
    return report


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: train.py also has --workdir)."""
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints and config.json.")
    flags.DEFINE_string("output", None, "Directory to write model.stablehlo and export.json to.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
    """absl entry point: exports and prints the metadata as one JSON line."""
    del argv
    print(json.dumps(export_run(FLAGS.workdir, FLAGS.output, FLAGS.step)))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
