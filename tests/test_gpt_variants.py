"""Tests for the GPT's transformer variants (models/gpt.py fields) and the z-loss (steps.py):
parameter counts, causality, cached decoding, references for each variant's formula, vocabulary
padding, sharding of the Llama-style preset, and training that lowers the loss."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import sampling
from models.gpt import (
    GPT,
    GPTConfigError,
    non_embedding_params,
    num_params,
    padded_vocab_size,
    stack_layers,
    training_flops_per_token,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

# 4 query heads of head_dim 4: grouped-query (2 kv heads) and multi-query (1) both fit.
TINY = dict(vocab_size=13, block_size=16, num_layers=2, num_heads=4, embed_dim=16)

VARIANTS = {
    "gpt2": dict(),
    "rmsnorm": dict(norm="rmsnorm", norm_epsilon=1e-6),
    "layernorm_no_bias_eps": dict(use_bias=False, norm_epsilon=1e-3),
    "qk_norm_rope": dict(qk_norm=True, position_embedding="rope"),
    "gelu_tanh": dict(mlp_activation="gelu_tanh"),
    "swiglu": dict(mlp_activation="swiglu", mlp_hidden_dim=24),
    "relu2": dict(mlp_activation="relu2", mlp_hidden_dim=40),
    "gqa": dict(num_kv_heads=2),
    "mqa_rope": dict(num_kv_heads=1, position_embedding="rope"),
    "softcap": dict(attn_logit_softcap=0.5),
    "untied_padded": dict(tie_embeddings=False, vocab_pad_multiple=8),
    # Combinations: the causality and cache test runs these, so that every value of every
    # field is compiled once without one compile per variant.
    "rmsnorm_tanh_qk": dict(
        norm="rmsnorm", mlp_activation="gelu_tanh", qk_norm=True, position_embedding="rope"
    ),
    "relu2_gqa_softcap": dict(
        mlp_activation="relu2", num_kv_heads=2, attn_logit_softcap=0.5, use_bias=False
    ),
    "swiglu_mqa_untied_padded": dict(
        mlp_activation="swiglu",
        num_kv_heads=1,
        position_embedding="rope",
        tie_embeddings=False,
        vocab_pad_multiple=8,
    ),
    "llama": dict(
        use_bias=False,
        position_embedding="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        mlp_hidden_dim=24,
        num_kv_heads=2,
        tie_embeddings=False,
    ),
    "llama_scanned": dict(
        use_bias=False,
        position_embedding="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        num_kv_heads=2,
        tie_embeddings=False,
        scan_layers=True,
    ),
    "everything": dict(
        use_bias=False,
        position_embedding="rope",
        norm="rmsnorm",
        qk_norm=True,
        mlp_activation="swiglu",
        num_kv_heads=1,
        attn_logit_softcap=2.0,
        tie_embeddings=False,
        vocab_pad_multiple=16,
    ),
}


def _model(variant: str, **kwargs) -> GPT:
    return GPT(**{**TINY, **VARIANTS[variant], **kwargs})


def _tokens(length: int, batch: int = 2, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"])


def _init(model: GPT, length: int = 8) -> dict:
    """Unboxed params of model (initialised on tokens[2, length])."""
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), _tokens(length))["params"])


def _forward(model: GPT):
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_num_params_matches_init(variant: str) -> None:
    """num_params equals the initialised model's count, unrolled and scanned; the FLOPs'
    non-embedding count drops the position table and (untied) the input table."""
    model = _model(variant)
    for m in (model, model.clone(scan_layers=True)):
        shapes = jax.eval_shape(m.init, jax.random.key(0), _tokens(8))["params"]
        sizes = {
            "/".join(str(k.key) for k in path): int(np.prod(leaf.shape))
            for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes))
        }
        assert sum(sizes.values()) == num_params(m), sizes
    wpe = sizes.get("wpe", 0)
    wte = sizes["wte/embedding"]
    untied = "lm_head/kernel" in sizes
    assert untied == (not model.tie_embeddings)
    assert non_embedding_params(model) == num_params(model) - wpe - (wte if untied else 0)
    head_dim = model.embed_dim // model.num_heads
    expected = 6 * non_embedding_params(model) + 12 * 2 * 4 * head_dim * 16
    assert training_flops_per_token(model, 16) == expected


def test_num_params_follows_each_field() -> None:
    """The formula's terms, one field at a time, against hand counts (embed 16, 2 layers)."""
    base = GPT(**TINY, use_bias=False, position_embedding="rope")
    e, layers = 16, 2
    n = num_params(base)
    # Two kv heads of four: key and value lose half their columns.
    assert num_params(base.clone(num_kv_heads=2)) == n - layers * 2 * (e * e // 2)
    # SwiGLU adds the gate: one more embed x hidden matrix per layer.
    assert num_params(base.clone(mlp_activation="swiglu")) == n + layers * e * 4 * e
    assert num_params(base.clone(mlp_hidden_dim=10)) == n - layers * 2 * e * (4 * e - 10)
    # QK-norm: two scales of head_dim per layer; untied head: embed x padded vocab.
    assert num_params(base.clone(qk_norm=True)) == n + layers * 2 * 4
    assert num_params(base.clone(tie_embeddings=False)) == n + e * 13
    assert num_params(base.clone(vocab_pad_multiple=8)) == n + e * 3
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(64, 64) == 64
    # GQA lowers the FLOPs per token through N only (the attention term counts query heads).
    drop = training_flops_per_token(base, 16) - training_flops_per_token(
        base.clone(num_kv_heads=2), 16
    )
    assert drop == 6 * layers * e * e


def _full_and_cached(model: GPT):
    """One compiled function: (params, tokens[2, 11], changed[2, 11]) -> (full-pass logits of
    tokens, of changed, and tokens' logits decoded through the KV cache: a prefill of 4 tokens
    then one token at a time)."""
    decoder = model.clone(decode=True)

    def run(params, tokens, changed):
        both = model.apply({"params": params}, jnp.concatenate([tokens, changed]))
        cache = sampling.init_cache(model, tokens.shape[0])
        prefill, state = decoder.apply(
            {"params": params, "cache": cache}, tokens[:, :4], mutable=["cache"]
        )

        def step(cache, token):
            logits, state = decoder.apply(
                {"params": params, "cache": cache}, token[:, None], mutable=["cache"]
            )
            return state["cache"], logits[:, 0]

        cache, steps = jax.lax.scan(step, state["cache"], tokens[:, 4:].T)
        decoded = jnp.concatenate([prefill, steps.swapaxes(0, 1)], axis=1)
        return both[: tokens.shape[0]], both[tokens.shape[0] :], decoded, cache

    return jax.jit(run)


# Every field's every value in at least one model (the single-field variants differ from
# these only position-wise or are GPT-2, which tests/test_gpt.py covers).
CAUSAL_VARIANTS = (
    "rmsnorm_tanh_qk",
    "relu2_gqa_softcap",
    "swiglu_mqa_untied_padded",
    "llama",
    "llama_scanned",
    "everything",
)
CAUSAL_CASES = [(variant, "auto") for variant in CAUSAL_VARIANTS] + [
    ("gqa", "xla"),  # jax.nn.dot_product_attention with fewer kv heads, full and cached
    ("mqa_rope", "xla"),
]


@pytest.mark.parametrize("variant, attention_impl", CAUSAL_CASES)
def test_causal_and_cached_decoding(variant: str, attention_impl: str) -> None:
    """Changing a future token leaves earlier logits unchanged; prefill + one token at a time
    through the KV cache (sized by the kv heads) reproduces the full forward pass."""
    model = _model(variant, attention_impl=attention_impl)
    params = _init(model)
    tokens = _tokens(11)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY["vocab_size"])
    full, full_changed, decoded, cache = _full_and_cached(model)(params, tokens, changed)
    assert full.shape == (2, 11, TINY["vocab_size"]) and full.dtype == jnp.float32
    np.testing.assert_array_equal(full_changed[:, :6], full[:, :6])
    assert not np.allclose(full_changed[:, 6:], full[:, 6:])
    np.testing.assert_allclose(decoded, full, atol=1e-5)
    kv_heads = model.num_kv_heads or model.num_heads
    if model.scan_layers:  # one cache stacked over the layers
        assert cache["h"]["attn"]["cached_key"].shape == (2, 2, 16, kv_heads, 4)
    else:
        assert cache["h_0"]["attn"]["cached_key"].shape == (2, 16, kv_heads, 4)
    assert int(cache["cache_index"]) == 11


def test_grouped_attention_impls_and_scan() -> None:
    """Grouped-query attention: the explicit einsums ('plain') and jax.nn.dot_product_attention
    ('xla') agree; the scanned layout computes the unrolled one's logits."""
    model = _model("everything", attn_logit_softcap=None, attention_impl="plain")
    params = _init(model)
    tokens = _tokens(9)
    xla, scanned = model.clone(attention_impl="xla"), model.clone(scan_layers=True)

    @jax.jit
    def forward(params, stacked, tokens):
        return (
            model.apply({"params": params}, tokens),
            xla.apply({"params": params}, tokens),
            scanned.apply({"params": stacked}, tokens),
        )

    plain, other, scan = forward(params, stack_layers(params, model.num_layers), tokens)
    np.testing.assert_allclose(other, plain, atol=1e-5)
    np.testing.assert_allclose(scan, plain, atol=1e-5)


def test_gqa_equals_multi_head_with_repeated_kv() -> None:
    """A grouped-query model is the multi-head model whose key/value heads are the shared
    ones repeated over each group (query head h uses kv head h // group, as Llama's repeat_kv)."""
    gqa = _model("gqa")
    params = _init(gqa)
    mha = gqa.clone(num_kv_heads=None)
    repeated = jax.tree.map(lambda x: x, params)
    for i in range(TINY["num_layers"]):
        attn = repeated[f"h_{i}"]["attn"]
        for name in ("key", "value"):
            attn[name] = {
                "kernel": jnp.repeat(attn[name]["kernel"], 2, axis=1),
                "bias": jnp.repeat(attn[name]["bias"], 2, axis=0),
            }
    tokens = _tokens(9)
    np.testing.assert_allclose(
        _forward(mha)(repeated, tokens), _forward(gqa)(params, tokens), atol=1e-5
    )


@pytest.mark.parametrize(
    "activation, reference",
    [
        ("gelu", lambda h, g: 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))),
        (
            "gelu_tanh",  # GPT-2's gelu (its model.py)
            lambda h, g: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        ),
        ("relu2", lambda h, g: np.maximum(h, 0) ** 2),
        ("swiglu", lambda h, g: g / (1 + np.exp(-g)) * h),  # silu(x W_gate) * (x W_fc)
    ],
)
def test_mlp_activation_formulas(activation: str, reference) -> None:
    """Each MLP equals its formula computed in numpy from the layer's own kernels."""
    from models.gpt import FeedForward

    model = GPT(**TINY, mlp_activation=activation, mlp_hidden_dim=24)
    layer = FeedForward(model.block_config())  # the block's MLP, as GPT builds it
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    boxed = layer.init(jax.random.key(0), x)["params"]
    mlp = jax.device_get(nn.unbox(boxed))
    assert mlp["fc"]["kernel"].shape == (16, 24) and mlp["proj"]["kernel"].shape == (24, 16)
    assert ("gate" in mlp) == (activation == "swiglu")
    # Non-zero biases, so that a bias left out would show.
    mlp = jax.tree.map(lambda a: a + 0.1 * np.arange(a.size).reshape(a.shape) / a.size, mlp)
    x = np.asarray(x, np.float64)
    h = x @ mlp["fc"]["kernel"] + mlp["fc"]["bias"]
    g = x @ mlp["gate"]["kernel"] + mlp["gate"]["bias"] if "gate" in mlp else None
    expected = np.asarray(reference(h, g)) @ mlp["proj"]["kernel"] + mlp["proj"]["bias"]
    np.testing.assert_allclose(layer.apply({"params": mlp}, x), expected, atol=1e-5)


def test_rmsnorm_and_qk_norm_parameters() -> None:
    """RMSNorm keeps the norms' names with a scale only and computes x / rms(x) * scale;
    QK-norm adds query_norm and key_norm scales over head_dim on the 'kv' axis."""
    model = _model("everything")
    boxed = jax.eval_shape(model.init, jax.random.key(0), _tokens(8))["params"]
    specs = nn.get_partition_spec(boxed)
    attn = specs["h_0"]["attn"]
    assert set(specs["ln_f"]) == {"scale"} and set(specs["h_0"]["ln_1"]) == {"scale"}
    assert tuple(attn["query_norm"]["scale"]) == ("kv",)
    assert tuple(attn["key_norm"]["scale"]) == ("kv",)
    assert tuple(attn["key"]["kernel"]) == ("embed", "kv_heads", "kv")
    assert tuple(attn["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["h_0"]["mlp"]["gate"]["kernel"]) == ("embed", "mlp")
    scanned = jax.eval_shape(model.clone(scan_layers=True).init, jax.random.key(0), _tokens(8))[
        "params"
    ]
    scanned_specs = nn.get_partition_spec(scanned)
    assert tuple(scanned_specs["h"]["attn"]["key"]["kernel"]) == (
        "layers", "embed", "kv_heads", "kv"
    )  # fmt: skip
    # A multi-head model keeps 'heads' on its keys and values (today's sharding).
    mha = nn.get_partition_spec(
        jax.eval_shape(GPT(**TINY).init, jax.random.key(0), _tokens(8))["params"]
    )
    assert tuple(mha["h_0"]["attn"]["key"]["kernel"]) == ("embed", "heads", "kv")

    from models.gpt import _norm

    x = jax.random.normal(jax.random.key(4), (3, 16))
    scale = jax.random.normal(jax.random.key(5), (16,))
    norm = _norm("rmsnorm", 1e-6, True, jnp.float32, "n")
    y = norm.apply({"params": {"scale": scale}}, x)
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_softcap_bounds_scores_and_large_cap_is_off() -> None:
    """Soft-capping cap * tanh(s / cap): a cap far above the scores changes nothing; a small
    cap changes the logits; the plain attention equals the formula on explicit scores."""
    from models.gpt import plain_attention

    model = _model("gqa")
    params = _init(model)
    for i in range(TINY["num_layers"]):  # scores of order 1 (at init they are ~1e-3)
        query = params[f"h_{i}"]["attn"]["query"]
        query["kernel"] = query["kernel"] * 300.0
    tokens = _tokens(9)
    large, small = model.clone(attn_logit_softcap=1e6), model.clone(attn_logit_softcap=0.1)

    @jax.jit
    def forward(params, tokens):
        return [m.apply({"params": params}, tokens) for m in (model, large, small)]

    base, with_large, with_small = forward(params, tokens)
    np.testing.assert_allclose(with_large, base, atol=1e-5)
    assert not np.allclose(with_small, base, atol=1e-3)
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 4, 8)) * 4 for i in range(3))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    scores = np.where(mask, 3.0 * np.tanh(scores / 3.0), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    np.testing.assert_allclose(plain_attention(q, k, v, mask, 3.0), expected, atol=1e-5)


def test_vocab_padding_never_scored_or_sampled() -> None:
    """vocab_pad_multiple pads the embedding and lm_head rows; the logits have vocab_size
    entries, and padding rows that would win every argmax and every sample if they were
    scored are never sampled."""
    for tied in (True, False):
        model = GPT(**TINY, vocab_pad_multiple=8, tie_embeddings=tied)
        params = _init(model)
        head = "wte" if tied else "lm_head"
        assert params["wte"]["embedding"].shape == (16, 16)
        if not tied:
            assert params["lm_head"]["kernel"].shape == (16, 16)
        tokens = _tokens(5)
        forward = _forward(model)
        before = forward(params, tokens)
        # ln_f outputs its bias, all ones, so that each output row's logit is the sum of its
        # weights: 50 * 16 = 800 for the padding rows, about 0 for the real ones.
        boosted = jax.tree.map(lambda a: a, params)
        boosted["ln_f"] = {"scale": jnp.zeros(16), "bias": jnp.ones(16)}
        if tied:
            boosted["wte"]["embedding"] = params["wte"]["embedding"].at[13:].set(50.0)
        else:
            boosted["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 13:].set(50.0)
        # Unsliced (the same parameters read as a 16-token vocabulary), padding would win.
        unsliced = model.clone(vocab_size=16).apply({"params": boosted}, tokens)
        assert bool(jnp.all(jnp.argmax(unsliced, -1) >= 13)), head
        logits = forward(boosted, tokens)
        assert logits.shape == (2, 5, 13) and float(jnp.max(jnp.abs(logits))) < 1.0
        if not tied:  # with ln_f restored, the real logits are untouched by the padding rows
            restored = {**boosted, "ln_f": params["ln_f"]}
            np.testing.assert_allclose(forward(restored, tokens), before, atol=1e-6)
        else:  # generation through the KV cache (5 + 11 tokens fill the block)
            out = sampling.generate(model, boosted, tokens, jax.random.key(0), 11, temperature=2.0)
            assert out.shape == (2, 16) and int(out.max()) < 13


def test_bad_variant_fields_fail_with_one_line_naming_the_field() -> None:
    """Invalid combinations raise GPTConfigError (a ValueError, in one line) naming the field;
    config_validation reports it before anything compiles as a ConfigError (a cli.UserError:
    one `ERROR:` line)."""
    import config_validation
    from configs import shakespeare_char_cpu
    from runtime import cli

    cases = {
        "num_kv_heads": dict(num_kv_heads=3),
        "norm": dict(norm="batchnorm"),
        "mlp_activation": dict(mlp_activation="geglu"),
        "position_embedding='rope'": dict(position_embedding="rope", embed_dim=12, num_heads=4),
        "attn_logit_softcap": dict(attn_logit_softcap=-1.0),
        "vocab_pad_multiple": dict(vocab_pad_multiple=0),
        "mlp_hidden_dim": dict(mlp_hidden_dim=0),
        "norm_epsilon": dict(norm_epsilon=0.0),
    }
    for field, kwargs in cases.items():
        with pytest.raises(GPTConfigError, match=f"model.{field}") as error:
            GPT(**{**TINY, **kwargs}).init(jax.random.key(0), _tokens(4))
        assert "\n" not in str(error.value)
        config = shakespeare_char_cpu.get_config()
        config.model.update({**TINY, **kwargs})
        with pytest.raises(config_validation.ConfigError, match=f"model.{field}") as error:
            config_validation.validate(config, num_devices=1)
        assert isinstance(error.value, cli.UserError) and "\n" not in str(error.value)
    with pytest.raises(GPTConfigError, match="attention_impl"):
        GPT(**TINY, attn_logit_softcap=5.0, attention_impl="cudnn").init(
            jax.random.key(0), _tokens(4)
        )


def _tiny_run(z_loss: float, grad_accum_steps: int = 1):
    """One train step of a tiny GPT through experiment.build_run (SGD, no clipping): returns
    (metrics, new params, initial params, model, batch)."""
    import sharded_driver

    import experiment

    config = sharded_driver.tiny_config(
        "gpt", mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, z_loss=z_loss
    )
    config.grad_clip_norm = 0.0
    config.weight_decay = 0.0
    config.b1 = 0.0  # plain SGD (no Nesterov momentum): the update is -lr * gradient
    config.grad_accum_steps = grad_accum_steps
    config.dataset = "synthetic"  # random windows [32, 16] of the config's 32 tokens
    run = experiment.build_run(config, devices=jax.devices()[:1])
    batch = next(run.datasets.train_batches())
    state = run.init_state()
    initial = jax.device_get(state.params)
    with run.compiled.context():
        new_state, metrics = run.compiled.train_step(state, run.compiled.put_train_batch(batch))
    return jax.device_get(metrics), jax.device_get(new_state.params), initial, run.model, batch


def test_z_loss_changes_the_objective_by_its_formula() -> None:
    """With z_loss = w the logged loss (the cross-entropy) is unchanged, z_loss is
    w * mean(logsumexp(logits)^2) and the SGD update differs by exactly -lr * its gradient;
    with gradient accumulation the same."""
    w, lr = 0.3, 0.1
    off, params_off, initial, model, batch = _tiny_run(0.0)
    on, params_on, _, _, _ = _tiny_run(w)
    accum, params_accum, _, _, _ = _tiny_run(w, grad_accum_steps=2)
    assert "z_loss" not in off
    np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-6)

    def z_term(params):
        logits = model.apply({"params": params}, batch["inputs"])
        return w * jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))

    value, grads = jax.jit(jax.value_and_grad(z_term))(initial)
    logits = np.asarray(model.apply({"params": initial}, batch["inputs"]), np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    np.testing.assert_allclose(on["z_loss"], w * np.mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(on["z_loss"], value, rtol=1e-5)
    assert on["z_loss"] > 0.1  # large enough that the checks below mean something
    jax.tree.map(
        lambda a, b, g: np.testing.assert_allclose(a - b, -lr * g, atol=2e-7),
        params_on,
        params_off,
        grads,
    )
    np.testing.assert_allclose(accum["z_loss"], on["z_loss"], rtol=1e-5)
    np.testing.assert_allclose(accum["loss"], on["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_accum, params_on)


def test_llama_style_cpu_trains_on_tiny_shakespeare(tmp_path) -> None:
    """The llama_style_cpu preset (at its own size, on Tiny Shakespeare) lowers the training
    and validation loss in 60 steps; the run's parameter count is the formula's."""
    import json

    import train
    from configs import llama_style_cpu
    from runtime import metrics_writer

    config = llama_style_cpu.get_config()
    config.num_train_steps = config.decay_steps = 60
    config.warmup_steps = 5
    config.log_every_steps = config.eval_every_steps = 20
    config.checkpoint_every_steps = 60
    config.eval_steps = 4
    config.sample_every_eval = False
    config.async_checkpointing = False
    config.z_loss = 1e-4
    workdir = str(tmp_path / "llama")
    final = train.train_and_evaluate(config, workdir)
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    z_losses = [r["train/z_loss"] for r in rows if "train/z_loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(train_losses) == 3 and len(z_losses) == 3 and len(val) >= 2, rows
    # From ln(65) = 4.17 (uniform) at step 0 to about 2.6 by step 60 (2.60 measured).
    assert train_losses[0] > train_losses[1] > train_losses[2], train_losses
    assert val[0] > val[-1] and val[-1] < 2.8, val
    assert all(0 < z < 1e-4 * 10**2 for z in z_losses), z_losses  # 1e-4 * log(Z)^2, log Z < 10
    with open(os.path.join(workdir, "config.json")) as f:
        model_config = json.load(f)["model"]
    assert model_config["num_kv_heads"] == 2 and model_config["tie_embeddings"] is False
    assert final["num_params"] == num_params(GPT(**{k: v for k, v in model_config.items()
                                                    if k != "name"}))  # fmt: skip


# The llama_style_cpu preset's block at the sharding tests' size (8 query heads of 8, 4 kv
# heads, 32 characters), its 32-row vocabulary padded to 64 rows.
LLAMA_SHARDED = {
    "use_bias": False,
    "position_embedding": "rope",
    "norm": "rmsnorm",
    "mlp_activation": "swiglu",
    "mlp_hidden_dim": 128,
    "num_kv_heads": 4,
    "tie_embeddings": False,
    "vocab_pad_multiple": 64,
}
LLAMA_MESHES = {
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, {"h_0/attn/key/kernel": (8, 4, 8)}),
    # 4 kv heads over tensor 4: one each; the query heads two each (their groups).
    "fsdp2_tensor4": (
        {"data": 1, "fsdp": 2, "tensor": 4},
        {
            "h_0/attn/query/kernel": (32, 2, 8),
            "h_0/attn/key/kernel": (32, 1, 8),
            "h_0/attn/value/kernel": (32, 1, 8),
            "h_0/mlp/gate/kernel": (32, 32),
            "lm_head/kernel": (32, 16),
            "wte/embedding": (16, 32),
        },
    ),
    # 8 does not divide the 4 kv heads: keys and values stay whole, queries split.
    "tensor8": (
        {"data": 1, "fsdp": 1, "tensor": 8},
        {
            "h_0/attn/query/kernel": (64, 1, 8),
            "h_0/attn/key/kernel": (64, 4, 8),
            "lm_head/kernel": (64, 8),
        },
    ),
}


def test_llama_style_sharded_matches_one_device(tmp_path) -> None:
    """The Llama-style block (RMSNorm, SwiGLU, rope, GQA, no bias, untied, padded vocabulary)
    trains the same losses and parameters over fsdp=8, fsdp=2 x tensor=4 and tensor=8 (8
    simulated devices) as on one device; kv heads split over `tensor` only where it divides
    them."""
    import sharded_driver
    from test_sharding import run_driver

    import train

    corpus = sharded_driver.write_corpus(str(tmp_path / "corpus.txt"))
    cases = [
        {
            "kind": "train",
            "name": name,
            "model": "gpt",
            "corpus": corpus,
            "workdir": str(tmp_path / name),
            "overrides": {"mesh_shape": mesh, "model": LLAMA_SHARDED},
        }
        for name, (mesh, _) in LLAMA_MESHES.items()
    ]
    wait = run_driver(cases)  # the 8-device runs proceed while this process runs the baseline
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    config = sharded_driver.tiny_config("gpt", corpus, mesh_shape=one, model=LLAMA_SHARDED)
    train.train_and_evaluate(config, str(tmp_path / "one"))
    results = wait()
    for name, (_, shards) in LLAMA_MESHES.items():
        sharded_driver.assert_same_run(str(tmp_path / name), str(tmp_path / "one"), name)
        params = results[name]["params"]
        assert params["lm_head/kernel"]["shape"] == [64, 64]
        for param, shard in shards.items():
            assert tuple(params[param]["shard"]) == shard, (name, param, params[param])
