"""Tests for the GPT model: causality, KV cache, parameter count, init, partitioning, remat; and,
on whatever accelerator runs them, the attention implementations, cached decoding and bf16."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sharding
from models.gpt import (
    GPT,
    flops_per_token,
    non_embedding_params,
    num_params,
    stack_layers,
    unstack_layers,
)

TINY = dict(vocab_size=13, block_size=16, num_layers=2, num_heads=2, embed_dim=16)


def _init(model: GPT, length: int = 8, batch: int = 2) -> tuple[dict, jax.Array]:
    """Initialises model; returns unboxed params and random tokens[batch, length]."""
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, model.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    return params, tokens


def _forward(model: GPT):
    """Jitted tokens -> logits of model (eager op-by-op execution is slow on CPU)."""
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def _count(params: dict) -> int:
    """Total number of scalars in a params tree."""
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_causal(position_embedding: str) -> None:
    """Changing a future token never changes the logits at earlier positions."""
    model = GPT(**TINY, position_embedding=position_embedding, attention_impl="plain")
    params, tokens = _init(model)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % model.vocab_size)
    for impl in ("plain", "xla"):
        forward = _forward(model.clone(attention_impl=impl))
        a, b = forward(params, tokens), forward(params, changed)
        np.testing.assert_array_equal(a[:, :5], b[:, :5])
        assert not np.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
@pytest.mark.parametrize("attention_impl", ["auto", "plain"])
def test_cached_decoding_matches_full_forward(position_embedding: str, attention_impl: str) -> None:
    """Prefill + one-token-at-a-time decoding reproduces the full forward pass."""
    model = GPT(**TINY, position_embedding=position_embedding, attention_impl=attention_impl)
    params, tokens = _init(model, length=11)
    full = _forward(model)(params, tokens)

    decoder = model.clone(decode=True)
    decode_step = jax.jit(
        lambda cache, chunk: decoder.apply(
            {"params": params, "cache": cache}, chunk, mutable=["cache"]
        )
    )
    empty = jnp.ones((2, model.block_size), jnp.int32)
    cache = jax.jit(decoder.init)(jax.random.key(0), empty)["cache"]
    # init only creates the cache: index 0, nothing written yet.
    assert all(not np.any(x) for x in jax.tree.leaves(cache))
    chunks = [tokens[:, :4]] + [tokens[:, t : t + 1] for t in range(4, 11)]
    outputs = []
    for chunk in chunks:
        logits, state = decode_step(cache, chunk)
        cache = state["cache"]
        outputs.append(logits)
    assert int(cache["cache_index"]) == 11
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(use_bias=False),
        dict(position_embedding="rope"),
        dict(use_bias=False, position_embedding="rope", mlp_ratio=2, num_layers=3),
    ],
)
def test_num_params_matches_model(kwargs: dict) -> None:
    """The analytic parameter count equals the initialised model's."""
    model = GPT(**{**TINY, **kwargs})
    params, _ = _init(model)
    expected = num_params(model)
    assert _count(params) == expected
    wpe = params["wpe"].size if "wpe" in params else 0
    assert non_embedding_params(model) == expected - wpe


def test_flops_per_token() -> None:
    """6N + 12 L H Q T, e.g. for GPT-2 small's attention term."""
    assert flops_per_token(1000, 12, 12, 64, 1024) == 6000 + 12 * 12 * 12 * 64 * 1024


def test_plain_attention_matches_xla() -> None:
    """'plain', 'xla' and 'auto' attention agree."""
    model = GPT(**TINY, attention_impl="plain")
    params, tokens = _init(model, length=16)
    plain = model.apply({"params": params}, tokens)
    for impl in ("xla", "auto"):
        other = model.clone(attention_impl=impl).apply({"params": params}, tokens)
        np.testing.assert_allclose(other, plain, atol=1e-5)


def test_output_tied_to_embedding() -> None:
    """There is no separate lm_head: zeroing the token embedding zeroes the logits."""
    model = GPT(**TINY)
    params, tokens = _init(model)
    assert set(params) == {"wte", "wpe", "ln_f", "h_0", "h_1"}
    assert params["wte"]["embedding"].shape == (TINY["vocab_size"], TINY["embed_dim"])
    zeroed = {**params, "wte": {"embedding": jnp.zeros_like(params["wte"]["embedding"])}}
    np.testing.assert_array_equal(model.apply({"params": zeroed}, tokens), 0.0)


def test_init_std() -> None:
    """Weights ~ N(0, 0.02), residual projections ~ N(0, 0.02/sqrt(2L)), biases 0, LN scale 1."""
    model = GPT(vocab_size=64, block_size=64, num_layers=8, num_heads=4, embed_dim=128)
    params, _ = _init(model)
    block = params["h_3"]
    residual_std = 0.02 / np.sqrt(2 * 8)
    for w, std in [
        (params["wte"]["embedding"], 0.02),
        (params["wpe"], 0.02),
        (block["attn"]["query"]["kernel"], 0.02),
        (block["mlp"]["fc"]["kernel"], 0.02),
        (block["attn"]["out"]["kernel"], residual_std),
        (block["mlp"]["proj"]["kernel"], residual_std),
    ]:
        assert abs(float(jnp.std(w)) / std - 1) < 0.1, (w.shape, float(jnp.std(w)), std)
    np.testing.assert_array_equal(block["mlp"]["proj"]["bias"], 0.0)
    np.testing.assert_array_equal(block["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(block["ln_1"]["bias"], 0.0)


def test_logical_partitioning() -> None:
    """Every parameter is LogicallyPartitioned with the expected logical axis names."""
    model = GPT(**TINY)
    tokens = jnp.zeros((2, 8), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)

    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["wte"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["wpe"]) == (None, "embed")
    assert tuple(specs["ln_f"]["scale"]) == ("embed",)
    for i in range(TINY["num_layers"]):
        block = specs[f"h_{i}"]
        for name in ("query", "key", "value"):
            assert tuple(block["attn"][name]["kernel"]) == ("embed", "heads", "kv")
            assert tuple(block["attn"][name]["bias"]) == ("heads", "kv")
        assert tuple(block["attn"]["out"]["kernel"]) == ("heads", "kv", "embed")
        assert tuple(block["attn"]["out"]["bias"]) == ("embed",)
        assert tuple(block["mlp"]["fc"]["kernel"]) == ("embed", "mlp")
        assert tuple(block["mlp"]["fc"]["bias"]) == ("mlp",)
        assert tuple(block["mlp"]["proj"]["kernel"]) == ("mlp", "embed")
        for ln in ("ln_1", "ln_2"):
            assert tuple(block[ln]["scale"]) == ("embed",)
            assert tuple(block[ln]["bias"]) == ("embed",)


def _loss(model: GPT, params: dict, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of tokens[batch, length]."""
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply({"params": params}, tokens[:, :-1], train=rng is not None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_matches_no_remat(policy: str) -> None:
    """Rematerialisation changes memory use, not the loss or the gradients (dropout included)."""
    model = GPT(**TINY, dropout_rate=0.1)
    params, tokens = _init(model, length=9)
    rng = jax.random.key(7)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _loss(model, p, tokens, rng)))(params)
    remat = model.clone(remat_policy=policy)
    loss_r, grads_r = jax.jit(jax.value_and_grad(lambda p: _loss(remat, p, tokens, rng)))(params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)


def test_dropout_only_in_training() -> None:
    """Dropout uses the 'dropout' rng when train=True and is off otherwise."""
    model = GPT(**TINY, dropout_rate=0.5)
    params, tokens = _init(model)
    eval_a = model.apply({"params": params}, tokens)
    eval_b = model.clone(dropout_rate=0.0).apply({"params": params}, tokens)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train, eval_a)


def test_bfloat16_compute() -> None:
    """bf16 compute keeps float32 params, returns float32 logits close to the float32 ones."""
    model = GPT(**TINY, dtype=jnp.bfloat16)
    params, tokens = _init(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    reference = model.clone(dtype=jnp.float32).apply({"params": params}, tokens)
    np.testing.assert_allclose(logits, reference, atol=0.05)


def test_invalid_config_and_length() -> None:
    """Unknown options and over-long inputs raise ValueError."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    for bad in (
        dict(attention_impl="flash"),
        dict(remat_policy="some"),
        dict(position_embedding="alibi"),
        dict(num_heads=3),
    ):
        with pytest.raises(ValueError):
            GPT(**{**TINY, **bad}).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="block_size"):
        GPT(**TINY).init(jax.random.key(0), jnp.zeros((1, TINY["block_size"] + 1), jnp.int32))


def test_loss_falls() -> None:
    """A few dozen AdamW steps on a repeated string clearly reduce the cross-entropy."""
    text = "hello world! " * 4
    vocab = sorted(set(text))
    ids = jnp.array([[vocab.index(c) for c in text[:33]]], jnp.int32)
    model = GPT(vocab_size=len(vocab), block_size=32, num_layers=2, num_heads=2, embed_dim=32)
    params, _ = _init(model)
    optimizer = optax.adamw(3e-3, weight_decay=0.1)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: _loss(model, p, ids))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    final = float(_loss(model, params, ids))
    assert first > 2.0 and final < 0.5 * first, (first, final)


# scan_layers: the blocks as one nn.scan over stacked parameters.


def _stacked(model: GPT, params: dict) -> dict:
    """Unrolled parameters of `model` in the scan_layers layout."""
    return stack_layers(params, model.num_layers)


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_scan_layers_matches_unrolled(position_embedding: str) -> None:
    """The scanned model computes the unrolled one's logits and gradients from the same
    (stacked) parameters; stacking and unstacking round-trip."""
    model = GPT(**TINY, position_embedding=position_embedding)
    scanned = model.clone(scan_layers=True)
    params, tokens = _init(model, length=9)
    stacked = _stacked(model, params)
    np.testing.assert_allclose(
        _forward(scanned)(stacked, tokens), _forward(model)(params, tokens), atol=1e-5
    )
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _loss(model, p, tokens)))(params)
    loss_s, grads_s = jax.jit(jax.value_and_grad(lambda p: _loss(scanned, p, tokens)))(stacked)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), unstack_layers(grads_s), grads
    )
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)


def test_scan_layers_parameters() -> None:
    """Parameters stacked in `h` with a leading logical 'layers' axis (left unsharded by the
    rules), as many as num_params counts, initialised like the unrolled model's."""
    model = GPT(vocab_size=64, block_size=64, num_layers=8, num_heads=4, embed_dim=128)
    scanned = model.clone(scan_layers=True)
    tokens = jnp.zeros((2, 8), jnp.int32)
    boxed = jax.eval_shape(scanned.init, jax.random.key(0), tokens)["params"]
    assert set(boxed) == {"wte", "wpe", "ln_f", "h"}
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["h"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["h"]["mlp"]["proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["h"]["ln_1"]["scale"]) == ("layers", "embed")
    assert dict(sharding.DEFAULT_RULES)["layers"] is None
    params = nn.unbox(jax.jit(scanned.init)(jax.random.key(0), tokens)["params"])
    assert params["h"]["attn"]["query"]["kernel"].shape == (8, 128, 4, 32)
    assert _count(params) == num_params(scanned) == num_params(model)
    layers = params["h"]
    residual_std = 0.02 / np.sqrt(2 * 8)
    for w, std in [
        (layers["attn"]["query"]["kernel"], 0.02),
        (layers["mlp"]["proj"]["kernel"], residual_std),
    ]:
        assert abs(float(jnp.std(w)) / std - 1) < 0.1, (float(jnp.std(w)), std)
    # Each layer draws its own weights.
    assert not np.allclose(layers["mlp"]["fc"]["kernel"][0], layers["mlp"]["fc"]["kernel"][1])
    np.testing.assert_array_equal(layers["ln_2"]["scale"], 1.0)


def test_scan_layers_training_equals_unrolled() -> None:
    """A few AdamW steps from equal initial parameters give equal losses in both layouts."""
    model = GPT(**TINY)
    scanned = model.clone(scan_layers=True)
    params, tokens = _init(model, length=12, batch=4)
    optimizer = optax.adamw(3e-3, weight_decay=0.1)

    def train(m: GPT, params: dict) -> list[float]:
        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(lambda p: _loss(m, p, tokens))(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        opt_state, losses = optimizer.init(params), []
        for _ in range(5):
            params, opt_state, loss = step(params, opt_state)
            losses.append(float(loss))
        return losses

    np.testing.assert_allclose(train(scanned, _stacked(model, params)), train(model, params),
                               rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_scan_layers_remat_matches_no_remat(policy: str) -> None:
    """Rematerialisation inside the scan changes neither the loss nor the gradients (dropout,
    drawn per layer, included)."""
    model = GPT(**TINY, dropout_rate=0.1, scan_layers=True)
    params, tokens = _init(model, length=9)
    rng = jax.random.key(7)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _loss(model, p, tokens, rng)))(params)
    remat = model.clone(remat_policy=policy)
    loss_r, grads_r = jax.jit(jax.value_and_grad(lambda p: _loss(remat, p, tokens, rng)))(params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)
    no_dropout = model.apply({"params": params}, tokens[:, :-1])
    dropped = model.apply({"params": params}, tokens[:, :-1], train=True, rngs={"dropout": rng})
    assert not np.allclose(dropped, no_dropout)


@pytest.mark.parametrize("position_embedding", ["learned", "rope"])
def test_scan_layers_cached_decoding_matches_full_forward(position_embedding: str) -> None:
    """With scan_layers the KV cache is stacked per layer, and prefill + one-token decoding
    reproduces the full forward pass; sampling.generate runs on it."""
    import sampling

    model = GPT(**TINY, position_embedding=position_embedding, scan_layers=True)
    params, tokens = _init(model, length=11)
    full = _forward(model)(params, tokens)
    decoder = model.clone(decode=True)
    decode_step = jax.jit(
        lambda cache, chunk: decoder.apply(
            {"params": params, "cache": cache}, chunk, mutable=["cache"]
        )
    )
    cache = jax.jit(decoder.init)(jax.random.key(0), jnp.ones((2, model.block_size), jnp.int32))
    cache = cache["cache"]
    head_dim = TINY["embed_dim"] // TINY["num_heads"]
    stacked_shape = (TINY["num_layers"], 2, TINY["block_size"], TINY["num_heads"], head_dim)
    assert cache["h"]["attn"]["cached_key"].shape == stacked_shape
    outputs = []
    for chunk in [tokens[:, :4]] + [tokens[:, t : t + 1] for t in range(4, 11)]:
        logits, state = decode_step(cache, chunk)
        cache = state["cache"]
        outputs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5)
    out = sampling.generate(model, params, tokens[:, :3], jax.random.key(0), max_new_tokens=5,
                            temperature=0.0)  # fmt: skip
    assert out.shape == (2, 8)


def test_scan_layers_checkpoint_refused_by_other_layout(tmp_path) -> None:
    """A checkpoint of the unrolled layout does not restore into a scan_layers config (nor the
    reverse): one clear CheckpointMismatchError naming the arrays that differ."""
    import checkpointing
    import experiment
    from configs import shakespeare_char_cpu

    config = shakespeare_char_cpu.get_config()
    config.model.update(num_layers=2, num_heads=2, embed_dim=16, block_size=16, vocab_size=13)
    config.batch_size = config.eval_batch_size = 4
    config.dataset = "synthetic"  # the shapes alone: nothing is trained
    runs = {}
    for scan in (False, True):
        config.model.scan_layers = scan
        runs[scan] = experiment.build_run(config, devices=jax.devices()[:1])
    for saved, wanted in ((False, True), (True, False)):
        workdir = str(tmp_path / f"scan_{saved}")
        checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
        checkpointer.save(0, runs[saved].init_state(), {"step": 0})
        checkpointer.close()
        checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
        with pytest.raises(checkpointing.CheckpointMismatchError) as error:
            checkpointer.restore_latest(runs[wanted].abstract_state)
        checkpointer.close()
        message = str(error.value)
        assert "does not fit this config's model" in message
        # e.g. "params/h/attn/key/kernel: checkpoint None vs config (2, 16, 2, 8)"
        assert "arrays differ" in message and "params/h/" in message, message


# On whatever accelerator runs the tests (a GPU's cuDNN cases are skipped elsewhere): the
# attention implementations agree, cached decoding reproduces the forward pass, and bf16
# compute keeps float32 state. `python -m pytest tests/test_gpt.py` on a GPU machine runs them
# there (docs/gpu.md).

ACCELERATOR_GPT = dict(vocab_size=65, block_size=64, num_layers=2, num_heads=4, embed_dim=128)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _skip_unless_available(impl: str) -> None:
    if impl == "cudnn" and not _on_gpu():
        pytest.skip("cuDNN attention needs a CUDA GPU")


def _precision(dtype: str) -> contextlib.AbstractContextManager:
    """float32 compared at full matmul precision (a GPU's default may be TF32)."""
    if dtype == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def _relative_tree_diff(a, b) -> float:
    """|a - b| / |b| over every leaf of two pytrees (global norms, float64)."""
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    diff = sum(float(np.sum((np.float64(x) - np.float64(y)) ** 2)) for x, y in leaves)
    norm = sum(float(np.sum(np.float64(y) ** 2)) for y in jax.tree.leaves(b))
    return (diff / max(norm, 1e-30)) ** 0.5


@pytest.mark.parametrize(
    "dtype, impl, logit_tol, grad_tol",
    [("float32", "xla", 1e-4, 1e-4), ("bfloat16", "xla", 0.05, 0.05),
     ("bfloat16", "cudnn", 0.05, 0.05)],  # cuDNN's attention takes bf16 (or fp16) only
)  # fmt: skip
def test_attention_impls_agree_with_plain(dtype, impl, logit_tol, grad_tol) -> None:
    """Logits and the loss's gradients of 'xla' (and, on a GPU, 'cudnn') attention equal the
    explicit 'plain' reference's at the same compute dtype and parameters."""
    _skip_unless_available(impl)
    base = GPT(**ACCELERATOR_GPT, attention_impl="plain")
    params, tokens = _init(base, length=base.block_size, batch=4)
    results = {}
    with _precision(dtype):
        for name in ("plain", impl):
            model = base.clone(attention_impl=name, dtype=jnp.dtype(dtype))

            def loss(params, model=model):
                logits = model.apply({"params": params}, tokens)
                targets = jnp.roll(tokens, -1, axis=1)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
                return ce.mean(), logits

            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            results[name] = (np.asarray(logits), jax.device_get(grads))
    (logits, grads), (ref_logits, ref_grads) = results[impl], results["plain"]
    assert np.max(np.abs(logits - ref_logits)) <= logit_tol
    assert _relative_tree_diff(grads, ref_grads) <= grad_tol


@pytest.mark.parametrize(
    "dtype, impl, tolerance",
    [("float32", "xla", 1e-4), ("bfloat16", "auto", 0.1), ("bfloat16", "cudnn", 0.1)],
)
def test_cached_decoding_matches_forward_on_this_accelerator(dtype, impl, tolerance) -> None:
    """Prefill, then one token at a time through sampling.init_cache's KV cache, reproduces
    the full forward pass's logits with each attention implementation and compute dtype."""
    import sampling

    _skip_unless_available(impl)
    model = GPT(**ACCELERATOR_GPT, attention_impl=impl, dtype=jnp.dtype(dtype))
    params, tokens = _init(model, length=24)
    decoder = model.clone(decode=True)
    step = jax.jit(
        lambda cache, chunk: decoder.apply(
            {"params": params, "cache": cache}, chunk, mutable=["cache"]
        )  # fmt: skip
    )
    with _precision(dtype):
        full = _forward(model)(params, tokens)
        cache, pieces = sampling.init_cache(model, tokens.shape[0]), []
        for chunk in [tokens[:, :4]] + [tokens[:, t : t + 1] for t in range(4, 24)]:
            logits, state = step(cache, chunk)
            cache = state["cache"]
            pieces.append(logits)
    diff = np.max(np.abs(np.asarray(jnp.concatenate(pieces, axis=1) - full, np.float32)))
    assert diff <= tolerance


def test_bfloat16_train_step_keeps_float32_state() -> None:
    """config.dtype='bfloat16' through experiment.build_run (on synthetic tokens): bf16 in the
    compiled program, float32 parameters and optimizer state after three steps, losses within
    2% of a float32 run's. On a GPU, bf16 uses cuDNN's attention and float32 XLA's."""
    import experiment
    from configs import shakespeare_char

    impls = {"float32": "xla", "bfloat16": "cudnn"} if _on_gpu() else {}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = shakespeare_char.get_config()
        config.model.update(num_layers=1, num_heads=4, embed_dim=64, block_size=32,
                            vocab_size=65, dropout_rate=0.0,
                            attention_impl=impls.get(dtype, "auto"))  # fmt: skip
        config.update(dataset="synthetic", dtype=dtype, batch_size=8, num_train_steps=10,
                      steps_per_dispatch=1)  # fmt: skip
        run = experiment.build_run(config, devices=jax.devices()[:1])
        compiled, batches = run.compiled, run.datasets.train_batches(0, 1, 3)
        state, losses[dtype] = compiled.from_global(run.init_state()), []
        with compiled.context(), jax.default_matmul_precision("highest"):
            batches = [compiled.put_train_batch(b) for b in batches]
            lowered = compiled.train_step.lower(state, batches[0])
            if dtype == "bfloat16":
                assert "bf16" in lowered.as_text()
            step = lowered.compile()
            for batch in batches:
                state, metrics = step(state, batch)
                losses[dtype].append(float(metrics["loss"]))
        floating = [x for x in jax.tree.leaves((state.params, state.opt_state))
                    if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
        assert floating and {str(x.dtype) for x in floating} == {"float32"}, dtype
    assert np.all(np.isfinite(losses["bfloat16"]))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.02)
