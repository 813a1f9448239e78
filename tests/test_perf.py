"""Performance invariants of the real training step: no recompilation, no hidden host-device
copies, float32 master weights under bfloat16 compute, and rematerialisation that changes
nothing but memory."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import experiment
import train

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compile_events():
    """A list that receives one entry per XLA compilation while the test runs."""
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            events.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_no_recompilation_in_training_loop(
    task, tiny_mlp_config, tiny_lm_config, compile_events, monkeypatch, tmp_path
):
    """Over the steps of train_and_evaluate (logging included), nothing compiles after step 2."""
    config = tiny_mlp_config if task == "classification" else tiny_lm_config
    config.num_train_steps = 12
    config.log_every_steps = 3
    config.eval_every_steps = 1000  # evaluation compiles its own step; keep it out of the loop
    config.checkpoint_every_steps = 1000
    counts = []  # compilations so far, each time the loop takes its next batch
    original = train.prefetch_to_device

    def counting_prefetch(batches, put, size=2):
        for batch in original(batches, put, size):
            counts.append(len(compile_events))
            yield batch

    monkeypatch.setattr(train, "prefetch_to_device", counting_prefetch)
    train.train_and_evaluate(config, str(tmp_path))
    assert len(counts) == 12
    assert counts[0] < counts[2], "the first step should have compiled the train step"
    assert counts[2:] == [counts[2]] * 10, (counts, compile_events[counts[2] :])


def _steps_state_and_batches(config, n: int = 3):
    """The run's compiled steps, a fresh state in their layout and n batches on the device."""
    run = experiment.build_run(config)
    compiled = run.compiled
    iterator = run.datasets.train_batches(0)
    batches = [compiled.put_train_batch(next(iterator)) for _ in range(n)]
    return compiled, compiled.from_global(run.init_state()), batches


def _steps(compiled, state, batches):
    """Runs one train step per batch; returns the state and the per-step losses."""
    losses = []
    with compiled.context():
        for batch in batches:
            state, metrics = compiled.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_steady_state_steps_make_no_host_transfers(task, tiny_mlp_config, tiny_lm_config):
    """With transfers disallowed, compiled steps run: no host round trip inside the step."""
    config = tiny_mlp_config if task == "classification" else tiny_lm_config
    compiled, state, batches = _steps_state_and_batches(config, 4)
    with compiled.context():
        state, metrics = compiled.train_step(state, batches[0])  # compiles
        jax.block_until_ready(metrics)
        with jax.transfer_guard("disallow"):
            for batch in batches[1:]:
                state, metrics = compiled.train_step(state, batch)
            jax.block_until_ready((state, metrics))
    assert np.isfinite(float(metrics["loss"]))


def test_transfer_guard_catches_a_host_copy():
    """The guard used above does fire on an implicit host-to-device copy."""
    f = jax.jit(lambda x: x + 1)
    f(np.float32(1.0))
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        f(np.ones(3, np.float32))


def _floating_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.floating)]


def test_bfloat16_keeps_float32_master_weights(tiny_lm_config):
    """config.dtype='bfloat16': bf16 matmuls, float32 params and optimizer state, similar loss."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_lm_config.copy_and_resolve_references()
        config.dtype = dtype
        compiled, state, batches = _steps_state_and_batches(config, 3)
        if dtype == "bfloat16":
            with compiled.context():
                hlo = compiled.train_step.lower(state, batches[0]).as_text()
            assert "bf16" in hlo
        state, losses[dtype] = _steps(compiled, state, batches)
        leaves = _floating_leaves(state.params) + _floating_leaves(state.opt_state)
        assert leaves and all(x.dtype == np.float32 for x in leaves), dtype
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)


def test_remat_train_step_matches_no_remat(tiny_lm_config):
    """Three train steps with each remat policy: the losses and params of no remat."""
    results = {}
    from models.gpt import REMAT_POLICIES

    for remat in REMAT_POLICIES:  # none first: the reference
        config = tiny_lm_config.copy_and_resolve_references()
        config.model.remat_policy = remat
        config.model.dropout_rate = 0.1  # remat must replay the same dropout masks
        compiled, state, batches = _steps_state_and_batches(config, 3)
        results[remat] = _steps(compiled, state, batches)
    state_a, loss_a = results.pop("none")
    for state_b, loss_b in results.values():
        np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
            state_a.params,
            state_b.params,
        )
