"""Tests for fine-tuning (config.init_from): copied and re-initialised parameters, freezing,
and mode='state' continuing the source run's optimizer."""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import pytest

import checkpointing
import config_validation
import experiment
import finetune
import train
from runtime import workdir_files


def _source_config(workdir: str):
    """The config the source run was trained with, as train.py saved it."""
    return workdir_files.load_config(workdir)


def _params(workdir: str, step: int | None = None) -> dict:
    return jax.device_get(experiment.restore_run(workdir, step).params)


def _finetune_config(source: str, steps: int, **init_from):
    config = _source_config(source)
    config.num_train_steps = steps
    config.log_every_steps = steps
    config.steps_per_dispatch = 1  # the test steps one batch at a time
    config.eval_every_steps = 1000
    config.restart = False
    config.init_from.workdir = source
    config.init_from.update(init_from)
    return config


def test_new_head_is_refused_unless_named_in_reinit(trained_mlp_run, tmp_path):
    """12 classes instead of 10: the head cannot start from the source's, so the run is refused
    in one line naming head/bias and head/kernel and the fix (init_from.reinit), before any
    step; nothing is re-initialised that the user did not name."""
    config = _finetune_config(trained_mlp_run, steps=1)
    config.model.num_classes = 12
    with pytest.raises(finetune.InitFromError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "2 of its 4 parameter arrays cannot start from the source's" in message, message
    assert "shape (32, 10) in the source, (32, 12) in the model: head/kernel" in message, message
    assert "head/bias" in message and "config.init_from.reinit" in message, message
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "1"))


def test_new_head_is_reinitialised_and_reported(trained_mlp_run, tmp_path, capsys):
    """12 classes instead of 10 with init_from.reinit=('head',): only the head is
    re-initialised (and listed); the hidden layer starts from the source's weights."""
    config = _finetune_config(trained_mlp_run, steps=1, reinit=("head",))
    config.model.num_classes = 12
    config.learning_rate = 0.0  # keep the copied weights where they are, to compare them
    config.warmup_steps = 0
    train.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    reported = re.search(r"re-initialised (\d+): \[(.*)\]", out)
    assert reported, out
    assert int(reported.group(1)) == 2
    assert sorted(reported.group(2).replace("'", "").split(", ")) == ["head/bias", "head/kernel"]
    assert "copied 2 parameter arrays" in out

    source, tuned = _params(trained_mlp_run), _params(str(tmp_path))
    np.testing.assert_array_equal(tuned["dense_0"]["kernel"], source["dense_0"]["kernel"])
    np.testing.assert_array_equal(tuned["dense_0"]["bias"], source["dense_0"]["bias"])
    assert tuned["head"]["kernel"].shape == (32, 12) and source["head"]["kernel"].shape == (32, 10)


def test_frozen_parameters_do_not_change(trained_mlp_run, tmp_path):
    """With init_from.freeze=('dense_0',) the hidden layer stays exactly the source's (no update,
    no weight decay) while the head trains."""
    config = _finetune_config(trained_mlp_run, steps=4, freeze=("dense_0",))
    config.learning_rate = 1e-2
    config.weight_decay = 0.1
    train.train_and_evaluate(config, str(tmp_path))
    source, tuned = _params(trained_mlp_run), _params(str(tmp_path))
    np.testing.assert_array_equal(tuned["dense_0"]["kernel"], source["dense_0"]["kernel"])
    np.testing.assert_array_equal(tuned["dense_0"]["bias"], source["dense_0"]["bias"])
    assert not np.allclose(tuned["head"]["kernel"], source["head"]["kernel"])


def _train_steps(run: experiment.Run, state, start: int, stop: int):
    batches = run.datasets.train_batches(start)
    with run.compiled.context():
        for _ in range(start, stop):
            state, _ = run.compiled.train_step(state, run.compiled.put_train_batch(next(batches)))
    return state


def test_mode_state_continues_the_optimizer(trained_mlp_run):
    """mode='state' restores the step and the Adam moments: training on from the step-10
    checkpoint reproduces the source run's step-20 parameters; mode='params' does not."""
    config = _finetune_config(trained_mlp_run, steps=20, step=10, mode="state")
    run = experiment.build_run(config)
    state = finetune.init_from(run, run.init_state())
    saved, _ = checkpointing.read_state_as_numpy(trained_mlp_run, 10)
    assert int(state.step) == 10
    for ours, theirs in zip(
        jax.tree.leaves(jax.device_get(state.opt_state)),
        jax.tree.leaves(saved["opt_state"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    continued = jax.device_get(_train_steps(run, state, 10, 20).params)
    expected = _params(trained_mlp_run, 20)
    for a, b in zip(jax.tree.leaves(continued), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    config.init_from.mode = "params"  # fresh optimizer: step 0, zero moments, warmup again
    run = experiment.build_run(config)
    fresh = finetune.init_from(run, run.init_state())
    assert int(fresh.step) == 0
    restarted = jax.device_get(_train_steps(run, fresh, 10, 20).params)
    assert not np.allclose(restarted["dense_0"]["kernel"], expected["dense_0"]["kernel"])


def test_mode_state_refuses_other_shapes(trained_mlp_run):
    """The optimizer state cannot be carried over to parameters of other shapes."""
    config = _finetune_config(trained_mlp_run, steps=20, mode="state")
    config.model.num_classes = 12
    run = experiment.build_run(config)
    with pytest.raises(config_validation.ConfigError, match="mode='params'"):
        finetune.init_from(run, run.init_state())


def _flip_bytes_in_an_array(workdir: str, step: int) -> None:
    """Overwrites bytes in the middle of the checkpoint's largest data file (Orbax itself reads
    them back without complaint; only the checksums notice)."""
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(path, name) for path, _, names in os.walk(root) for name in names]
    with open(max(files, key=os.path.getsize), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\xff" * 64)


def test_init_from_refuses_a_damaged_checkpoint_as_resume_does(trained_mlp_run, tmp_path, caplog):
    """A corrupted array in the source: init_from skips that checkpoint with resume's warning
    and starts from the older, intact one; an explicitly requested damaged step, or a source
    whose checkpoints are all damaged, is refused (resume refuses the same way)."""
    source = str(tmp_path / "source")
    shutil.copytree(trained_mlp_run, source)
    _flip_bytes_in_an_array(source, 20)

    config = _finetune_config(source, steps=20, mode="state")
    run = experiment.build_run(config)
    state = finetune.init_from(run, run.init_state())
    assert "Checkpoint 20" in caplog.text and "checksum mismatch" in caplog.text
    assert int(state.step) == 10  # the newest intact checkpoint
    assert os.path.isdir(os.path.join(source, "checkpoints", "20"))  # a reader moves nothing

    config.init_from.step = 20
    with pytest.raises(checkpointing.CheckpointMismatchError, match="step 20 .* damaged"):
        finetune.init_from(experiment.build_run(config), run.init_state())

    _flip_bytes_in_an_array(source, 10)
    config.init_from.step = None
    with pytest.raises(checkpointing.CheckpointMismatchError, match="could be read"):
        finetune.init_from(experiment.build_run(config), run.init_state())
    with pytest.raises(checkpointing.CheckpointMismatchError, match="could be read"):
        train.train_and_evaluate(_source_config(source), source)  # resume: the same refusal


# ------------------------------------------- every parameter from the source, or a refusal


def _lm_run(tmp_path_factory, name: str, **model) -> str:
    """A 2-layer character GPT on the tiny corpus trained 4 steps (checkpoint at 4)."""
    from conftest import _tiny_lm_config

    config = _tiny_lm_config(_tiny_corpus_path(tmp_path_factory))
    config.model.update({"num_layers": 2, **model})
    config.update(num_train_steps=4, decay_steps=4, warmup_steps=1, eval_every_steps=100,
                  checkpoint_every_steps=4, log_every_steps=4)  # fmt: skip
    workdir = str(tmp_path_factory.mktemp(name))
    train.train_and_evaluate(config, workdir)
    return workdir


def _tiny_corpus_path(tmp_path_factory) -> str:
    path = tmp_path_factory.getbasetemp() / "finetune_corpus.txt"
    if not path.exists():
        words = ["the", "king", "and", "thou", "art", "my", "lord", "speak", "to", "me"]
        rng = np.random.default_rng(1)
        path.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(400)))
    return str(path)


@pytest.fixture(scope="module")
def scanned_lm_run(tmp_path_factory) -> str:
    """Trained with model.scan_layers=True: its blocks stacked in `h` [2, ...]."""
    return _lm_run(tmp_path_factory, "scanned_lm", scan_layers=True)


@pytest.fixture(scope="module")
def unrolled_lm_run(tmp_path_factory) -> str:
    """Trained with model.scan_layers=False: blocks h_0 and h_1."""
    return _lm_run(tmp_path_factory, "unrolled_lm", scan_layers=False)


def _start(source: str, mode: str = "params", **model):
    """(run, state after init_from) for the source's config with `model` fields changed."""
    config = _finetune_config(source, steps=1, mode=mode)
    config.model.update(model)
    run = experiment.build_run(config)
    return run, jax.device_get(finetune.init_from(run, run.init_state()))


def _logits(model, params) -> np.ndarray:
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % model.vocab_size
    return np.asarray(model.apply({"params": params}, tokens))


def _num_arrays(tree) -> int:
    return len(jax.tree.leaves(tree))


@pytest.mark.parametrize("direction", ["scanned->unrolled", "unrolled->scanned"])
def test_a_source_of_the_other_block_layout_is_converted(
    direction, scanned_lm_run, unrolled_lm_run, capsys
):
    """A run trained with scan_layers=True fine-tuned with scan_layers=False, and back: every
    block is the source's (layer i of the stack is h_i), the model computes the source's
    logits, and the run reports every array copied, none re-initialised, and the conversion.
    (Before: only the embeddings and the final norm were copied, every block started afresh.)"""
    scanned = direction.startswith("scanned")
    source_dir = scanned_lm_run if scanned else unrolled_lm_run
    run, state = _start(source_dir, scan_layers=not scanned)
    source = experiment.restore_run(source_dir)
    theirs = jax.device_get(source.params)
    ours = state.params
    stacked, unrolled = (theirs, ours) if scanned else (ours, theirs)
    for i in range(2):
        for a, b in zip(jax.tree.leaves(unrolled[f"h_{i}"]), jax.tree.leaves(stacked["h"]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b[i])
    np.testing.assert_array_equal(ours["wte"]["embedding"], theirs["wte"]["embedding"])
    np.testing.assert_allclose(_logits(run.model, ours), _logits(source.model, theirs),
                               atol=1e-5, rtol=0)  # fmt: skip
    out = capsys.readouterr().out
    assert f"copied {_num_arrays(ours)} parameter arrays; re-initialised 0: []" in out, out
    assert ("unstacked into h_0 ... h_1" if scanned else "h_0 ... h_1 stacked into h") in out


@pytest.mark.parametrize(
    "source, model, message",
    [
        ("scanned", {"num_layers": 3, "scan_layers": False},
         r"8 of its 27 parameter arrays .*the source has no such parameter: h_2/\*"),
        ("unrolled", {"num_layers": 1},
         r"and 8 of the source are left over .*the model has no place for the source's h_1/\*"),
        ("unrolled", {"num_layers": 3, "scan_layers": True},
         r"shape \(2, 32\) in the source, \(3, 32\) in the model: h/ln_1/scale"),
        ("scanned", {"embed_dim": 64, "num_heads": 4},
         r"shape \(32, 32\) in the source, \(32, 64\) in the model: wpe"),
    ],
    ids=["more-layers", "fewer-layers", "more-layers-scanned", "wider"],
)  # fmt: skip
def test_what_does_not_fit_is_refused_naming_it(
    source, model, message, scanned_lm_run, unrolled_lm_run, tmp_path
):
    """Blocks the source lacks, blocks it has in excess (in either layout) and other widths are
    refused in one line naming the paths and config.init_from.reinit, before any step."""
    config = _finetune_config(scanned_lm_run if source == "scanned" else unrolled_lm_run, 1)
    config.model.update(model)
    with pytest.raises(finetune.InitFromError, match=message) as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(error.value) and "config.init_from.reinit" in str(error.value)
    assert not os.path.isdir(os.path.join(tmp_path, "checkpoints", "1"))


def test_reinit_names_what_starts_afresh(scanned_lm_run, unrolled_lm_run, capsys):
    """init_from.reinit is the escape hatch: a third block starts afresh when named (the
    others are the source's), a source's block the model lacks is left out when named, and a
    pattern that names nothing is refused (a typo would otherwise be a silent no-op)."""
    config = _finetune_config(scanned_lm_run, steps=1, reinit=("h_2",))
    config.model.update(num_layers=3, scan_layers=False)
    run = experiment.build_run(config)
    fresh = jax.device_get(run.init_state())
    state = jax.device_get(finetune.init_from(run, run.init_state()))
    source = jax.device_get(experiment.restore_run(scanned_lm_run).params)
    for a, b in zip(jax.tree.leaves(state.params["h_2"]), jax.tree.leaves(fresh.params["h_2"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state.params["h_1"]["mlp"]["fc"]["kernel"],
                                  source["h"]["mlp"]["fc"]["kernel"][1])  # fmt: skip
    out = capsys.readouterr().out
    assert "copied 19 parameter arrays; re-initialised 8: ['h_2/" in out, out
    assert "(named by config.init_from.reinit)" in out

    config = _finetune_config(unrolled_lm_run, steps=1, reinit=("h_1",))
    config.model.update(num_layers=1)
    run = experiment.build_run(config)
    finetune.init_from(run, run.init_state())
    assert "left out the source's ['h_1/" in capsys.readouterr().out

    config.init_from.reinit = ("h_9", "wte")
    with pytest.raises(config_validation.ConfigError, match=r"\['h_9'\] name no parameter"):
        finetune.init_from(experiment.build_run(config), run.init_state())


def test_padding_rows_and_an_untied_output_are_converted(unrolled_lm_run, capsys):
    """The same model with its embedding padded (vocab_pad_multiple=64) and its output layer
    untied (tie_embeddings=False): the token rows are copied (padding is never scored), the
    output kernel is the source's embedding transposed, so the logits are the source's."""
    run, state = _start(unrolled_lm_run, vocab_pad_multiple=64, tie_embeddings=False)
    source = experiment.restore_run(unrolled_lm_run)
    theirs = jax.device_get(source.params)
    vocab = run.model.vocab_size
    assert state.params["wte"]["embedding"].shape[0] == 64 > vocab
    np.testing.assert_array_equal(state.params["wte"]["embedding"][:vocab],
                                  theirs["wte"]["embedding"][:vocab])  # fmt: skip
    np.testing.assert_array_equal(state.params["lm_head"]["kernel"][:, :vocab],
                                  theirs["wte"]["embedding"][:vocab].T)  # fmt: skip
    np.testing.assert_allclose(_logits(run.model, state.params), _logits(source.model, theirs),
                               atol=1e-5, rtol=0)  # fmt: skip
    out = capsys.readouterr().out
    assert "re-initialised 0: []" in out and "tied output layer" in out, out
    assert f"the {vocab} token rows of {vocab} (the rest is padding" in out, out


def test_mode_state_converts_the_optimizer_state_layout(scanned_lm_run):
    """mode='state' from a scanned source into an unrolled model: the step and Adam's moments
    are the source's, block i's moments taken from layer i of the stacked ones."""
    run, state = _start(scanned_lm_run, mode="state", scan_layers=False)
    assert int(state.step) == 4
    ours = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}  # fmt: skip
    source_opt = jax.device_get(experiment.restore_run(scanned_lm_run).state.opt_state)
    stacked = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(source_opt)[0]}  # fmt: skip
    compared = 0
    for key, value in ours.items():
        for i in range(2):
            if f"['h_{i}']" in key:
                np.testing.assert_array_equal(value, np.asarray(stacked[key.replace(
                    f"['h_{i}']", "['h']")])[i])  # fmt: skip
                compared += 1
    assert compared >= 2 * 8 and any(np.abs(v).sum() > 0 for v in ours.values())


def test_transfer_params_casts_only_without_loss():
    """Another float dtype is copied when every value survives the cast, refused otherwise."""
    import ml_dtypes

    fresh = {"w": np.zeros((2, 3), np.float32), "v": np.zeros((3,), ml_dtypes.bfloat16)}
    source = {"w": np.full((2, 3), 0.1, ml_dtypes.bfloat16), "v": np.full((3,), 0.1, np.float32)}
    done = finetune.transfer_params(fresh, source)
    assert done.copied == ["w"] and done.params["w"].dtype == np.float32
    assert done.problems == [("v", "float32 in the source, bfloat16 in the model: the cast "
                                   "would change values")]  # fmt: skip
    source["v"] = np.full((3,), 0.5, np.float32)  # exactly a bfloat16
    assert finetune.transfer_params(fresh, source).copied == ["w", "v"]


def test_another_tokenizer_is_refused_unless_its_rows_start_afresh(
    trained_lm_run, tmp_path, capsys
):
    """A character model fine-tuned on text of other characters (the same number of them): its
    embedding rows would mean other tokens, so the run is refused naming wte/embedding and
    both tokenizers; with init_from.reinit=('wte',) the embedding starts afresh and the rest is
    copied."""
    source_config = workdir_files.load_config(trained_lm_run)
    with open(source_config.dataset) as f:
        text = f.read()
    # Every letter replaced by the next (a bijection on a-z): as many characters, other ones.
    table = str.maketrans("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")
    corpus = tmp_path / "other.txt"
    corpus.write_text(text.translate(table))
    config = _finetune_config(trained_lm_run, steps=1)
    config.dataset = str(corpus)
    run = experiment.build_run(config)
    with pytest.raises(finetune.InitFromError, match=r"vocabulary rows would mean other tokens: "
                                                     r"wte/embedding"):  # fmt: skip
        finetune.init_from(run, run.init_state())
    config.init_from.reinit = ("wte",)
    state = finetune.init_from(experiment.build_run(config), run.init_state())
    assert "re-initialised 1: ['wte/embedding']" in capsys.readouterr().out
    source = experiment.restore_run(trained_lm_run).params
    assert not (state.params["wte"]["embedding"] == source["wte"]["embedding"]).all()
    assert (state.params["ln_f"]["scale"] == source["ln_f"]["scale"]).all()
