"""tools/export.py: the serialized StableHLO model is lowered for CPU, CUDA and TPU in one
artifact and gives the JAX model's outputs, at any batch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import experiment
from data import tokenization
from runtime import distributed
from tools import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exported_lm_matches_jax_model(trained_lm_run, tmp_path):
    """A trained GPT exported and reloaded: same logits as the Flax model, batches 1 and 3."""
    meta = export.export_run(trained_lm_run, str(tmp_path))
    assert os.path.exists(tmp_path / export.MODEL_FILE)
    written = json.loads((tmp_path / export.META_FILE).read_text())
    assert written["input_shape"][0] == "batch"
    assert written["platforms"] == meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert export.load(str(tmp_path)).platforms == ("cpu", "cuda", "tpu")
    tokenizer = tokenization.load_tokenizer(str(tmp_path))  # served next to the model
    restored = experiment.restore_run(trained_lm_run)
    model, params = restored.model, distributed.to_host(restored.params)
    block = restored.config.model.block_size
    assert meta["input_shape"] == ["batch", block]
    for batch in (1, 3):
        tokens = np.random.default_rng(batch).integers(0, tokenizer.vocab_size, (batch, block))
        expected = model.apply({"params": params}, tokens.astype(np.int32))
        np.testing.assert_allclose(export.run(str(tmp_path), tokens), expected, atol=1e-5)


def test_exported_classifier_matches_jax_model(trained_mlp_run, tmp_path):
    """The same for a Fashion-MNIST classifier, which takes raw uint8 pixels."""
    meta = export.export_run(trained_mlp_run, str(tmp_path))
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert export.load(str(tmp_path)).platforms == ("cpu", "cuda", "tpu")
    restored = experiment.restore_run(trained_mlp_run)
    images = jax.random.randint(jax.random.key(0), (5, 28, 28, 1), 0, 256).astype(jnp.uint8)
    expected = restored.model.apply(distributed.to_host(restored.variables), images)
    np.testing.assert_allclose(export.run(str(tmp_path), np.asarray(images)), expected, atol=1e-5)


def test_cudnn_attention_exports_for_every_platform_as_xla_attention():
    """A GPT that trains with cuDNN's fused attention exports with XLA's (cuDNN lowers for CUDA
    alone, and only where cuDNN is): the artifact names all three platforms and its CPU
    outputs equal the model's with the reference attention."""
    from models.gpt import GPT

    model = GPT(vocab_size=17, block_size=8, num_layers=1, num_heads=2, embed_dim=16,
                attention_impl="cudnn")  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, 17, (3, 8)).astype(np.int32)
    reference = model.clone(attention_impl="plain")
    variables = reference.init(jax.random.key(0), tokens)
    portable = export.portable_model(model)
    assert portable.attention_impl == "xla"
    exported = export.export_forward(portable, variables, tokens[:1])
    assert exported.platforms == ("cpu", "cuda", "tpu")
    np.testing.assert_allclose(exported.call(tokens), reference.apply(variables, tokens), atol=1e-5)


def test_cli_exports_from_the_repo_root(trained_mlp_run, tmp_path):
    """`python -m tools.export --workdir --output`, as the README shows: one JSON line, and the
    files it names; a missing workdir is one ERROR line with exit status 1."""
    out = tmp_path / "exported"
    args = [sys.executable, "-m", "tools.export", f"--workdir={trained_mlp_run}", f"--output={out}",
            "--step=10"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["step"] == 10 and meta["input_dtype"] == "uint8"
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert os.path.exists(out / export.MODEL_FILE) and os.path.exists(out / export.META_FILE)
    missing = [sys.executable, "-m", "tools.export", f"--workdir={tmp_path / 'none'}",
               f"--output={out}"]  # fmt: skip
    proc = subprocess.run(missing, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: ")
