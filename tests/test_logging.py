"""Tests that TensorBoard event files hold what train.py logs, and of data augmentation."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(workdir: str) -> event_accumulator.EventAccumulator:
    """TensorBoard's own reader over a run's event files, keeping every event."""
    sizes = {event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0}
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance=sizes
    )
    accumulator.Reload()
    return accumulator


def _series(acc: event_accumulator.EventAccumulator, tag: str) -> dict[int, object]:
    """{step: value} of a tag (TF2 summaries are stored as tensors, whatever their plugin)."""
    return {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)}


def _plugin(acc: event_accumulator.EventAccumulator, tag: str) -> str:
    return acc.SummaryMetadata(tag).plugin_data.plugin_name


def test_classifier_scalars_config_hparams_and_confusion_image(trained_mlp_run):
    """Training and eval scalars, the config text, hparams and the confusion-matrix image."""
    acc = _events(trained_mlp_run)
    tags = set(acc.Tags()["tensors"])
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/steps_per_sec",
        "train/examples_per_sec",
        "test/accuracy",
        "test/loss",
        "test/f1_macro",
    ):
        assert tag in tags and _plugin(acc, tag) == "scalars", tag
    losses = _series(acc, "train/loss")
    assert sorted(losses) == [5, 10, 15, 20]
    assert all(np.isfinite(float(v)) for v in losses.values())
    with open(os.path.join(trained_mlp_run, "final_metrics.json")) as f:
        final = json.load(f)
    assert float(_series(acc, "test/accuracy")[20]) == pytest.approx(final["test_accuracy"])

    config_text = _series(acc, "config")[0].item().decode()
    assert _plugin(acc, "config") == "text" and '"batch_size": 32' in config_text
    assert any(tag.startswith("_hparams_/") for tag in tags)

    assert _plugin(acc, "test/confusion_matrix") == "images"
    width, height, png = _series(acc, "test/confusion_matrix")[20][:3]
    import matplotlib.pyplot as plt

    image = plt.imread(io.BytesIO(png), format="png")
    assert image.shape[:2] == (int(height), int(width)) and image.shape[0] > 100


def test_lm_logs_a_text_sample_at_each_evaluation(trained_lm_run, tiny_corpus):
    """A language model logs one generated sample per evaluation, in the corpus's alphabet."""
    acc = _events(trained_lm_run)
    assert "train/tokens_per_sec" in acc.Tags()["tensors"]
    samples = _series(acc, "samples")
    assert sorted(samples) == [6, 12] and _plugin(acc, "samples") == "text"
    with open(tiny_corpus) as f:
        alphabet = set(f.read())
    for value in samples.values():
        text = value.item().decode()
        body = text.removeprefix("```\n").removesuffix("\n```")
        assert len(body) == 201  # the prompt (one newline) and 200 new characters
        assert set(body) <= alphabet


def test_metrics_writer_needs_no_tensorflow(tmp_path):
    """The writer is built on the tensorboard package alone: importing it, and writing every
    kind of summary, imports no TensorFlow (the GPU machines have none)."""
    code = (
        "import sys, numpy as np\nfrom runtime import metrics_writer\n"
        "w = metrics_writer.MetricsWriter(sys.argv[1])\n"
        "w.write_scalars(1, {'loss': 1.0}, prefix='train/')\n"
        "w.write_text(1, 'samples', 'hi')\n"
        "w.write_image(1, 'img', np.zeros((4, 5, 3), np.uint8))\n"
        "w.write_hparams({'lr': 0.1})\n"
        "w.close()\n"
        "assert 'tensorflow' not in sys.modules, sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_writer_events_read_back_as_tensorboard_shows_them(tmp_path):
    """Each kind of summary, read back by TensorBoard's EventAccumulator: its plugin and value
    (an image as the image plugin's [width, height, png] with the pixels written; floats in
    [0, 1] scaled as tf.image.convert_image_dtype scales them), and a resumed writer drops the
    events after its step."""
    import matplotlib.pyplot as plt

    from runtime import metrics_writer

    writer = metrics_writer.MetricsWriter(str(tmp_path))
    writer.write_text(0, "config", "a `config`")
    writer.write_hparams({"lr": np.float32(0.5), "name": "x", "flag": True, "none": None})
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step}, prefix="train/")
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    writer.write_image(2, "rgb", rgb)
    grey = np.array([[0.0, 0.5, 1.0], [0.25, 0.75, 2.0]], np.float32)[..., None]
    writer.write_image(2, "grey", grey)
    writer.close()

    acc = _events(str(tmp_path))
    assert _plugin(acc, "train/loss") == "scalars"
    assert {k: float(v) for k, v in _series(acc, "train/loss").items()} == pytest.approx(
        {1: 1.0, 2: 0.5, 3: 1 / 3}
    )
    assert _plugin(acc, "config") == "text"
    assert _series(acc, "config")[0].item().decode() == "a `config`"
    assert _plugin(acc, "_hparams_/session_start_info") == "hparams"
    for tag, pixels in (("rgb", rgb), ("grey", np.repeat([[0, 127, 255], [63, 191, 255]], 3))):
        assert _plugin(acc, tag) == "images"
        width, height, png = _series(acc, tag)[2]
        decoded = np.round(plt.imread(io.BytesIO(png), format="png") * 255).astype(np.uint8)
        assert (int(width), int(height)) == (decoded.shape[1], decoded.shape[0])
        np.testing.assert_array_equal(decoded.ravel(), np.asarray(pixels).ravel())

    resumed = metrics_writer.MetricsWriter(str(tmp_path), resume_step=2)
    resumed.write_scalars(3, {"loss": 0.25}, prefix="train/")
    resumed.close()
    losses = _series(_events(str(tmp_path)), "train/loss")
    assert sorted(losses) == [1, 2, 3] and float(losses[3]) == 0.25
    assert [r["step"] for r in metrics_writer.read_jsonl(writer.jsonl_path)] == [1, 2, 3]


def _image_config(**augment):
    from configs import fashion_mnist_cnn

    config = fashion_mnist_cnn.get_config()
    config.batch_size = 16
    config.augment.random_flip = augment.get("flip", False)
    config.augment.random_crop_pad = augment.get("pad", 0)
    return config


def _shifted_candidates(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every flip x crop of a zero-padded image that the augmentation may produce."""
    out = []
    for flipped in (image, image[:, ::-1]):
        padded = np.pad(flipped, [(pad, pad), (pad, pad), (0, 0)])
        h, w = image.shape[:2]
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out.append(padded[dy : dy + h, dx : dx + w])
    return out


def test_augmentation_changes_images_but_not_shapes_labels_or_determinism(fashion_mnist_ready):
    """Crops and flips keep shapes and labels, change the pixels, stay a function of
    (seed, step), and every augmented image is a flip/shift of its original."""
    import input_pipeline

    plain = input_pipeline.get_datasets(_image_config())
    augmented = input_pipeline.get_datasets(_image_config(flip=True, pad=2))
    base = next(plain.train_batches(5))
    first = next(augmented.train_batches(5))
    again = next(augmented.train_batches(5))
    later = next(augmented.train_batches(6))

    assert first["inputs"].shape == base["inputs"].shape == (16, 28, 28, 1)
    np.testing.assert_array_equal(first["targets"], base["targets"])
    assert not np.array_equal(first["inputs"], base["inputs"])
    np.testing.assert_array_equal(first["inputs"], again["inputs"])
    assert not np.array_equal(first["inputs"], later["inputs"])
    assert first["inputs"].dtype == np.uint8  # raw pixels; the model scales them
    changed = 0
    for original, result in zip(base["inputs"], first["inputs"], strict=True):
        assert any(np.array_equal(result, c) for c in _shifted_candidates(original, 2))
        changed += not np.array_equal(result, original)
    assert changed >= 8  # P(unchanged) = 1/2 (no flip) x 1/25 (centre crop) per image
