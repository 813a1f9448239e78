"""Model output shapes and parameter counts of the classifiers, and the registry."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from configs import fashion_mnist_cnn, fashion_mnist_cnn_strong, fashion_mnist_mlp


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
