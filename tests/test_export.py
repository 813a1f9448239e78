"""export.py: the serialized StableHLO model gives the JAX model's outputs, at any batch size."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import checkpointing
import export
import models
import tokenizers_lib


def test_exported_lm_matches_jax_model(trained_lm_run, tmp_path):
    """A trained GPT exported and reloaded: same logits as the Flax model, batches 1 and 3."""
    meta = export.export_run(trained_lm_run, str(tmp_path))
    assert os.path.exists(tmp_path / export.MODEL_FILE)
    assert json.loads((tmp_path / export.META_FILE).read_text())["input_shape"][0] == "batch"
    tokenizer = tokenizers_lib.load_tokenizer(str(tmp_path))  # served next to the model
    config, params = checkpointing.load_for_inference(trained_lm_run)
    model = models.build_model(config)
    block = config.model.block_size
    assert meta["input_shape"] == ["batch", block]
    for batch in (1, 3):
        tokens = np.random.default_rng(batch).integers(0, tokenizer.vocab_size, (batch, block))
        expected = model.apply({"params": params}, tokens.astype(np.int32))
        np.testing.assert_allclose(export.run(str(tmp_path), tokens), expected, atol=1e-5)


def test_exported_classifier_matches_jax_model(trained_mlp_run, tmp_path):
    """The same for a Fashion-MNIST classifier, which takes raw uint8 pixels."""
    export.export_run(trained_mlp_run, str(tmp_path))
    config, params = checkpointing.load_for_inference(trained_mlp_run)
    images = jax.random.randint(jax.random.key(0), (5, 28, 28, 1), 0, 256).astype(jnp.uint8)
    expected = models.build_model(config).apply({"params": params}, images)
    np.testing.assert_allclose(export.run(str(tmp_path), np.asarray(images)), expected, atol=1e-5)
