"""Model output shapes and parameter counts of the classifiers, the registry, and GPT configs."""

import importlib
import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from configs import fashion_mnist_cnn, fashion_mnist_cnn_strong, fashion_mnist_mlp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init(config, shape=(4, 28, 28, 1)):
    model = models.build_model(config)
    x = jnp.zeros(shape)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    return model, variables, x


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def test_mlp_shape_and_keras_parameter_count():
    model, variables, x = _init(fashion_mnist_mlp.get_config())
    assert model.apply(variables, x).shape == (4, 10)
    # Keras Dense(128), Dense(64), Dense(10) on 784 inputs.
    assert _count(variables["params"]) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10


def test_cnn_shape_and_keras_parameter_count():
    model, variables, x = _init(fashion_mnist_cnn.get_config())
    assert model.apply(variables, x).shape == (4, 10)
    # Keras: Conv2D(32, 3) -> MaxPool(2) -> Flatten (13*13*32) -> Dense(128) -> Dense(10).
    expected = (3 * 3 * 32 + 32) + (13 * 13 * 32 * 128 + 128) + (128 * 10 + 10)
    assert _count(variables["params"]) == expected


def test_strong_cnn_has_batch_stats_and_trains_them():
    model, variables, x = _init(fashion_mnist_cnn_strong.get_config())
    assert "batch_stats" in variables
    logits, updates = model.apply(
        variables,
        x + 1.0,
        train=True,
        rngs={"dropout": jax.random.key(2)},
        mutable=["batch_stats"],
    )
    assert logits.shape == (4, 10)
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert any(jax.tree.leaves(changed))


def test_bfloat16_compute_returns_float32_logits():
    config = fashion_mnist_cnn.get_config()
    config.dtype = "bfloat16"
    model, variables, x = _init(config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x).dtype == jnp.float32


@pytest.mark.parametrize("config_module", [fashion_mnist_mlp, fashion_mnist_cnn])
def test_raw_uint8_pixels_equal_floats_scaled_to_unit_range(config_module):
    """The pipeline ships uint8 pixels; the model reads them as pixel / 255."""
    model, variables, _ = _init(config_module.get_config())
    pixels = jax.random.randint(jax.random.key(3), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
    from_uint8 = model.apply(variables, pixels)
    from_float = model.apply(variables, pixels.astype(jnp.float32) / 255.0)
    assert from_uint8.dtype == jnp.float32
    np.testing.assert_array_equal(from_uint8, from_float)


def test_unknown_model_name_is_rejected_with_the_choices():
    config = ml_collections.ConfigDict({"model": {"name": "resnet"}, "dtype": "float32"})
    with pytest.raises(ValueError, match="cnn.*gpt.*mlp"):
        models.build_model(config)


def _gpt_configs() -> list[str]:
    """The experiment configs (configs/*.py taking no argument) whose model is the GPT."""
    names = []
    for file in sorted(os.listdir(os.path.join(REPO, "configs"))):
        module = importlib.import_module(f"configs.{file[:-3]}") if file.endswith(".py") else None
        if module is None or not hasattr(module, "get_config") or file == "base.py":
            continue
        if inspect.signature(module.get_config).parameters:  # needs an argument (gpt2_finetune)
            continue
        if module.get_config().model.name == "gpt":
            names.append(file[:-3])
    return names


def test_every_gpt_config_exposes_every_gpt_field_to_the_command_line():
    names = _gpt_configs()
    assert {"shakespeare_char_cpu", "gpt2_small", "llama_style_cpu"} <= set(names), names
    fields = models.constructor_fields("gpt") - {"dtype", "decode"}
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        assert fields <= set(config.model), (name, sorted(fields - set(config.model)))
    # A variant field on a GPT-2-style config, as typed on a command line, builds that variant.
    result = subprocess.run(
        [sys.executable, "-c", _OVERRIDE_SCRIPT, "--config=configs/shakespeare_char_cpu.py",
         "--config.model.norm=rmsnorm", "--config.model.num_kv_heads=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["rmsnorm", "2"], result.stdout


_OVERRIDE_SCRIPT = """
import sys
from absl import flags
from ml_collections import config_flags
import models
config_flags.DEFINE_config_file("config")
flags.FLAGS(sys.argv)
model = models.build_model(flags.FLAGS.config)
print(model.norm, model.num_kv_heads)
"""
