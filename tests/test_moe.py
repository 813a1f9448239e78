"""Tests for the Mixture-of-Experts GPT (models/moe.py, the moe_* fields of models/gpt.py): each
dispatch against a reference, the losses against their papers' formulas, the bias balancing,
cached decoding, parameter counts, bad fields, training, the commands on an MoE run, and expert
parallelism on 8 simulated CPU devices against one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import models
import steps
from models import moe
from models.gpt import GPT, GPTConfigError, num_params, training_flops_per_token

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

TINY = dict(vocab_size=13, block_size=16, num_layers=2, num_heads=4, embed_dim=16)
MOE = dict(moe_num_experts=4, moe_top_k=2, moe_hidden_dim=24)
EMBED = 16


def _layer_config(**overrides) -> moe.MoEConfig:
    """A sparse layer's settings: 4 experts of width 8, top-2, softmax, dropless."""
    fields = dict(
        num_experts=4,
        top_k=2,
        hidden_dim=8,
        shared_hidden_dim=0,
        activation="gelu",
        router="softmax",
        norm_topk=False,
        dispatch="dropless",
        capacity_factor=1.25,
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        bias_update_rate=0.0,
        num_sparse_layers=1,
        residual_init_std=0.02,
        dropout_rate=0.0,
        decode=False,
        dtype=jnp.float32,
    )
    return moe.MoEConfig(**{**fields, **overrides})


def _inputs(shape=(2, 12, EMBED), seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _layer_params(layer: moe.MoEFeedForward, x: jax.Array, scale: float = 1.0) -> dict:
    """Unboxed parameters of `layer`, the experts' kernels scaled up (so that their outputs are
    far from zero and the comparisons below mean something)."""
    params = nn.unbox(layer.init(jax.random.key(1), x))["params"]
    for name in ("fc", "gate", "proj"):
        if name in params:
            params[name]["kernel"] = params[name]["kernel"] * 25.0
    params["router"]["kernel"] = params["router"]["kernel"] * scale
    return params


def _expert(params: dict, i: int, x: np.ndarray, activation: str) -> np.ndarray:
    """Expert i of a layer on tokens x [n, embed], in float64 numpy."""
    fc = np.asarray(params["fc"]["kernel"][i], np.float64)
    proj = np.asarray(params["proj"]["kernel"][i], np.float64)
    h = x @ fc
    if activation == "swiglu":
        gate = x @ np.asarray(params["gate"]["kernel"][i], np.float64)
        h = gate / (1 + np.exp(-gate)) * h
    else:
        from scipy.special import erf

        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h @ proj


# ---------------------------------------------------------------------------- the dispatches


@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_top1_is_the_dense_mlp(dispatch: str, activation: str) -> None:
    """A GPT whose MLPs are one expert chosen top-1 (gate weight softmax over one = 1) computes
    the dense GPT's logits when the expert holds the dense MLP's kernels."""
    dense = GPT(**TINY, use_bias=False, mlp_activation=activation, mlp_hidden_dim=24)
    sparse = dense.clone(
        moe_num_experts=1, moe_top_k=1, moe_hidden_dim=24, moe_dispatch=dispatch,
        moe_capacity_factor=1.0,  # capacity = length: nothing drops
    )  # fmt: skip
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, TINY["vocab_size"])
    params = nn.unbox(dense.init(jax.random.key(0), tokens))["params"]
    sparse_params = dict(params)
    for i in range(TINY["num_layers"]):
        layer = dict(params[f"h_{i}"])
        mlp = layer.pop("mlp")
        router = {"kernel": jax.random.normal(jax.random.key(i), (EMBED, 1))}
        layer["moe"] = {
            "router": router,
            **{k: {"kernel": v["kernel"][None]} for k, v in mlp.items()},
        }
        sparse_params[f"h_{i}"] = layer
    want = dense.apply({"params": params}, tokens)
    got = sparse.apply({"params": sparse_params}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
def test_every_expert_with_a_uniform_router_is_their_mean(dispatch: str) -> None:
    """top_k = num_experts, router kernel 0 (every probability 1/E, no renormalisation): the
    layer is the mean of its experts (capacity = length: nothing drops)."""
    layer = moe.MoEFeedForward(
        _layer_config(num_experts=3, top_k=3, dispatch=dispatch, capacity_factor=1.0)
    )
    x = _inputs()
    params = _layer_params(layer, x, scale=0.0)
    got = np.asarray(layer.apply({"params": params}, x))
    flat = np.asarray(x, np.float64).reshape(-1, EMBED)
    want = np.mean([_expert(params, i, flat, "gelu") for i in range(3)], axis=0)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got.reshape(-1, EMBED), want, rtol=1e-4, atol=1e-5)


def _apply_train(layer, params, x, collections=(models.METRICS, models.LOSSES)):
    return layer.apply({"params": params}, x, train=True, mutable=list(collections))


def _sown(variables: dict, collection: str) -> dict[str, float]:
    return {
        k: float(total / count)
        for k, (total, count) in steps.sown_scalars(variables.get(collection)).items()
    }


def test_dropless_and_capacity_agree_when_nothing_drops() -> None:
    """With capacity = length (capacity_factor = E / k) no assignment can drop: both dispatches
    give the same output and the same gradients, and the dropped fraction is 0."""
    x = _inputs()
    outputs = {}
    for dispatch in moe.DISPATCHES:
        layer = moe.MoEFeedForward(
            _layer_config(dispatch=dispatch, capacity_factor=2.0, activation="swiglu")
        )
        params = _layer_params(layer, x, scale=5.0)

        def loss(params, x, layer=layer):
            return jnp.sum(jnp.sin(layer.apply({"params": params}, x)))

        y, sown = _apply_train(layer, params, x)
        outputs[dispatch] = (y, jax.grad(loss, argnums=(0, 1))(params, x))
        if dispatch == "capacity":
            assert _sown(sown, models.METRICS)["moe_dropped_fraction"] == 0.0
    (y_a, g_a), (y_b, g_b) = outputs["dropless"], outputs["capacity"]
    assert float(jnp.abs(y_a).max()) > 0.1
    np.testing.assert_allclose(y_b, y_a, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), g_a, g_b)


def test_capacity_drops_what_a_hand_count_drops() -> None:
    """capacity 1 per expert and sequence (capacity_factor 0.1, 12 tokens, 4 experts, top-2):
    the assignments kept are those a hand count in GShard's priority keeps (every first choice
    before any second choice, in token order); the dropped fraction is theirs; a token's
    output is the gate-weighted sum of its kept experts only, 0 when all its choices dropped
    (the block then passes it on through the residual alone)."""
    c = _layer_config(dispatch="capacity", capacity_factor=0.1)
    layer = moe.MoEFeedForward(c)
    x = _inputs()
    params = _layer_params(layer, x, scale=5.0)
    y, sown = _apply_train(layer, params, x)
    groups, size, _ = x.shape
    cap = moe.capacity(size, c.top_k, c.num_experts, c.capacity_factor)
    assert cap == 1
    logits = np.asarray(x.reshape(-1, EMBED) @ params["router"]["kernel"])
    routing = moe.route(jnp.asarray(logits), None, c.top_k, c.router, c.norm_topk)
    experts = np.asarray(routing.experts).reshape(groups, size, c.top_k)
    weights = np.asarray(routing.weights).reshape(groups, size, c.top_k)
    flat = np.asarray(x, np.float64)
    want = np.zeros(flat.shape)
    dropped = 0
    for g in range(groups):
        used = [0] * c.num_experts
        for choice in range(c.top_k):
            for s in range(size):
                e = experts[g, s, choice]
                if used[e] < cap:
                    used[e] += 1
                    want[g, s] += weights[g, s, choice] * _expert(params, e, flat[g, s], "gelu")
                else:
                    dropped += 1
    fraction = dropped / (groups * size * c.top_k)
    assert fraction > 0.5
    np.testing.assert_allclose(_sown(sown, models.METRICS)["moe_dropped_fraction"], fraction)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    all_dropped = np.all(want == 0, axis=-1)
    assert all_dropped.any() and np.all(np.asarray(y)[all_dropped] == 0)


def test_capacity_masks_priority_on_a_fixed_routing() -> None:
    """GShard's slots on a routing written out by hand: capacity 2, expert 0 chosen first by
    tokens 0, 1, 2 and second by token 3: token 2's first choice and token 3's second drop."""
    experts = jnp.array([[[0, 1], [0, 2], [0, 1], [1, 0]]])  # [group 1, 4 tokens, top-2]
    weights = jnp.full((1, 4, 2), 0.5)
    dispatch, combine, kept = moe.capacity_masks(experts, weights, 3, 2)
    np.testing.assert_array_equal(kept[0], [[1, 1], [1, 1], [0, 0], [1, 0]])
    # Slots: expert 0 <- tokens 0, 1; expert 1 <- token 3 (first choice), token 0, then full.
    np.testing.assert_array_equal(dispatch[0, :, 0], [[1, 0], [0, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(dispatch[0, :, 1], [[0, 1], [0, 0], [0, 0], [1, 0]])
    np.testing.assert_array_equal(dispatch[0, :, 2], [[0, 0], [1, 0], [0, 0], [0, 0]])
    np.testing.assert_allclose(combine, 0.5 * dispatch)


# ---------------------------------------------------------------------------- losses, balancing


def _numpy_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("router", moe.ROUTERS)
def test_losses_are_their_papers_formulas(router: str) -> None:
    """On fixed logits: Switch Transformer's E * sum_i f_i P_i (f_i the fraction of the N*k
    assignments to expert i, P_i the mean probability; sigmoid scores normalised per token),
    1 when balanced and E when one expert takes every token with probability 1; ST-MoE's
    z-loss mean(logsumexp(logits)^2); the entropy; and the layer sows coefficient x loss."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(24, 4)) * 3
    routing = moe.route(jnp.asarray(logits, jnp.float32), None, 2, router, False)
    scores = _numpy_softmax(logits) if router == "softmax" else 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
    chosen = np.argsort(-scores, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(routing.experts), -1), np.sort(chosen, -1))
    f = np.bincount(chosen.reshape(-1), minlength=4) / chosen.size
    np.testing.assert_allclose(
        moe.load_balancing_loss(routing), 4 * np.sum(f * probs.mean(0)), rtol=1e-5
    )
    log_z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(moe.router_z_loss(routing.logits), np.mean(log_z**2), rtol=1e-5)
    entropy = -np.sum(probs * np.log(probs), -1).mean()
    np.testing.assert_allclose(moe.router_entropy(routing.probs), entropy, rtol=1e-5)
    # The bounds: balanced (a uniform router over 4 experts, each chosen equally) and collapsed.
    balanced = moe.Routing(jnp.array([[0], [1], [2], [3]]), None, jnp.full((4, 4), 0.25), None)
    assert float(moe.load_balancing_loss(balanced)) == pytest.approx(1.0)
    one_hot = jnp.eye(4)[jnp.zeros(4, jnp.int32)]  # every token: expert 0 with probability 1
    collapsed = moe.Routing(jnp.zeros((4, 1), jnp.int32), None, one_hot, None)
    assert float(moe.load_balancing_loss(collapsed)) == pytest.approx(4.0)
    # The layer sows coefficient x formula (one sparse layer: the share is 1).
    c = _layer_config(router=router, aux_loss_coef=0.25, z_loss_coef=0.5)
    layer = moe.MoEFeedForward(c)
    x = _inputs()
    params = _layer_params(layer, x, scale=3.0)
    _, sown = _apply_train(layer, params, x)
    layer_logits = x.reshape(-1, EMBED) @ params["router"]["kernel"]
    layer_routing = moe.route(layer_logits, None, 2, router, False)
    losses = _sown(sown, models.LOSSES)
    np.testing.assert_allclose(
        losses["moe_aux_loss"], 0.25 * moe.load_balancing_loss(layer_routing), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses["moe_z_loss"], 0.5 * moe.router_z_loss(layer_logits), rtol=1e-5
    )
    load = [_sown(sown, models.METRICS)[f"moe_load_e{i:02d}"] for i in range(4)]
    np.testing.assert_allclose(load, moe.expert_load(layer_routing.experts, 4), rtol=1e-6)
    assert sum(load) == pytest.approx(1.0)


def test_bias_balancing_moves_load_toward_uniform() -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing on a skewed sigmoid router (expert 0's
    logits raised by 2): applying the sown bias updates step after step (as train_step does)
    brings every expert's share (averaged over the last 200 of 400 steps) from 1, 0, 0, 0 to
    within 0.05 of the uniform 1/4, the bias
    lowering expert 0; the gate weights never see the bias."""
    c = _layer_config(router="sigmoid", top_k=1, bias_update_rate=0.005, norm_topk=True)
    layer = moe.MoEFeedForward(c)
    x = _inputs((8, 32, EMBED))
    params = _layer_params(layer, x)
    # A constant direction added to every token raises expert 0's logit by 2.
    x = x + jnp.array([2.0, 0.0, 0.0, 0.0]) @ jnp.linalg.pinv(params["router"]["kernel"])
    flat = x.reshape(-1, EMBED)

    def load(params):
        logits = flat @ params["router"]["kernel"]
        routing = moe.route(logits, params["router"]["bias"], 1, "sigmoid", True)
        return np.asarray(moe.expert_load(routing.experts, 4)), routing

    first, _ = load(params)
    assert first.max() > 0.6, first

    @jax.jit
    def step(params):
        _, sown = layer.apply({"params": params}, x, train=True, mutable=[models.PARAM_UPDATES])
        return steps.apply_param_updates(params, sown[models.PARAM_UPDATES])

    loads = []
    for _ in range(400):
        params = step(params)
        loads.append(load(params)[0])
    # Sign updates keep the bias moving around the balance: the load averaged over the last
    # 200 steps is near uniform.
    last = np.mean(loads[200:], axis=0)
    _, routing = load(params)
    assert last.max() < 0.3 and last.min() > 0.2, (first, last)
    assert float(params["router"]["bias"][0]) < 0
    assert np.all(np.asarray(routing.weights) == 1.0)  # top-1, renormalised: the bias never enters


# ---------------------------------------------------------------------------- the whole GPT

DECODE_VARIANTS = {
    "dropless": dict(MOE),
    "sigmoid_bias_shared_swiglu": dict(
        MOE,
        moe_router="sigmoid",
        moe_bias_update_rate=0.01,
        moe_norm_topk=True,
        moe_shared_experts=1,
        mlp_activation="swiglu",
        use_bias=False,
    ),  # fmt: skip
    "every_second_layer_rope": dict(MOE, moe_layer_freq=2, position_embedding="rope"),
    "scanned_first_dense": dict(MOE, scan_layers=True, moe_first_dense=1),
    # Decoding is dropless; with capacity = length the full pass drops nothing either.
    "capacity": dict(MOE, moe_dispatch="capacity", moe_capacity_factor=2.0),
}


@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
def test_causal_and_cached_decoding(variant: str) -> None:
    """Changing a future token leaves earlier logits unchanged (routing is per token: no token
    sees a later one through the experts); prefill + one token at a time through the KV cache
    reproduces the full forward pass."""
    from test_gpt_variants import _full_and_cached

    model = GPT(**TINY, **DECODE_VARIANTS[variant])
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, TINY["vocab_size"])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY["vocab_size"])
    full, full_changed, decoded, _ = _full_and_cached(model)(params, tokens, changed)
    np.testing.assert_array_equal(full_changed[:, :6], full[:, :6])
    assert not np.allclose(full_changed[:, 6:], full[:, 6:])
    np.testing.assert_allclose(decoded, full, atol=1e-5)


def test_scanned_first_dense_layout_converts_both_ways() -> None:
    """An MoE model whose first block stays dense: its unrolled parameters stacked with
    stack_layers(first_dense=1) are the scanned model's tree (h_dense and h) and compute its
    logits; unstack_layers returns them unchanged (what init_from's layout conversion uses)."""
    from models.gpt import stack_layers, unstack_layers

    model = GPT(**{**TINY, "num_layers": 3}, **MOE, moe_first_dense=1)
    scanned = model.clone(scan_layers=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, TINY["vocab_size"])
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    stacked = stack_layers(params, model.num_layers, first_dense=1)
    want = jax.eval_shape(scanned.init, jax.random.key(0), tokens)["params"]
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), nn.unbox(tree))  # noqa: E731
    assert shapes(stacked) == shapes(want)
    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, tokens), model.apply({"params": params}, tokens),
        atol=1e-5,
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    with pytest.raises(ValueError, match="first_dense=3"):
        stack_layers(params, model.num_layers, first_dense=3)


NUM_PARAM_VARIANTS = {
    "top2": dict(MOE),
    "swiglu_shared_bias": dict(
        MOE,
        mlp_activation="swiglu",
        moe_shared_experts=2,
        moe_router="sigmoid",
        moe_bias_update_rate=0.001,
    ),  # fmt: skip
    "every_second_no_bias": dict(MOE, moe_layer_freq=2, use_bias=False, num_layers=3),
    "scanned_first_dense": dict(MOE, scan_layers=True, moe_first_dense=1, num_layers=3),
}


@pytest.mark.parametrize("variant", list(NUM_PARAM_VARIANTS))
def test_num_params_total_and_active(variant: str) -> None:
    """num_params equals the initialised count; the active count replaces each sparse layer's
    E experts by its top k; the training FLOPs are the dense formula on the active count."""
    model = GPT(**{**TINY, **NUM_PARAM_VARIANTS[variant]})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    sizes = {
        "/".join(str(k.key) for k in path): int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["params"]))
    }
    assert sum(sizes.values()) == num_params(model), sizes
    expert_params = sum(n for path, n in sizes.items() if "/moe/" in path and "router" not in path)
    e, k = model.moe_num_experts, model.moe_top_k
    assert num_params(model, active=True) == num_params(model) - expert_params * (e - k) // e
    dense = 6 * (num_params(model, active=True) - sizes.get("wpe", 0))
    head_dim = model.embed_dim // model.num_heads
    attention = 12 * model.num_layers * model.num_heads * head_dim * 16
    assert training_flops_per_token(model, 16) == dense + attention


def test_dense_fields_unchanged() -> None:
    """moe_num_experts=0 (the default): the GPT's parameters are GPT-2's, whatever the other
    moe_* fields say, and it sows nothing."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    plain = GPT(**TINY)
    other = GPT(**TINY, moe_top_k=3, moe_dispatch="capacity", moe_layer_freq=2)
    a, b = (jax.eval_shape(m.init, jax.random.key(0), tokens) for m in (plain, other))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    params = nn.unbox(plain.init(jax.random.key(0), tokens))
    _, sown = plain.apply(params, tokens, train=True, mutable=[models.LOSSES, models.METRICS])
    assert not jax.tree.leaves(sown)


def test_bad_moe_fields_fail_with_one_line_naming_the_field() -> None:
    """top_k larger than the experts, a capacity factor <= 0, unknown router or dispatch, no
    sparse layer left, freq > 1 with scanned layers: a one-line MoEConfigError (a
    GPTConfigError's sibling, both models.ModelConfigError) naming the field, and a ConfigError
    from config_validation before anything compiles; the same for an expert axis that does not
    divide the experts, and for MoE fields on a model that has none."""
    import config_validation
    from configs import fashion_mnist_mlp, shakespeare_char_cpu

    cases = {
        "moe_top_k": dict(MOE, moe_top_k=5),
        "moe_capacity_factor": dict(MOE, moe_capacity_factor=0.0),
        "moe_router": dict(MOE, moe_router="hash"),
        "moe_dispatch": dict(MOE, moe_dispatch="token_choice"),
        "moe_first_dense": dict(MOE, moe_first_dense=2),
        "moe_layer_freq": dict(MOE, moe_layer_freq=2, scan_layers=True),
        "moe_hidden_dim": dict(MOE, moe_hidden_dim=0),
        "moe_aux_loss_coef": dict(MOE, moe_aux_loss_coef=-1.0),
    }
    for field, kwargs in cases.items():
        with pytest.raises(moe.MoEConfigError, match=f"model.{field}") as error:
            GPT(**{**TINY, **kwargs}).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        assert "\n" not in str(error.value) and not isinstance(error.value, GPTConfigError)
        assert isinstance(error.value, models.ModelConfigError)
        config = shakespeare_char_cpu.get_config()
        config.model.update({**TINY, **kwargs})
        with pytest.raises(config_validation.ConfigError, match=f"model.{field}") as error:
            config_validation.validate(config, num_devices=1)
        assert "\n" not in str(error.value)
    config = shakespeare_char_cpu.get_config()
    config.model.update({**TINY, **MOE})
    config.mesh_shape.update({"data": 1, "expert": 8})
    config.batch_size = config.eval_batch_size = 16
    with pytest.raises(config_validation.ConfigError, match="mesh_shape.expert=8") as error:
        config_validation.validate(config, num_devices=8)
    assert "model.moe_num_experts=4" in str(error.value) and "\n" not in str(error.value)
    config.mesh_shape.expert = 4
    config.mesh_shape.data = 2
    config_validation.validate(config, num_devices=8)  # 4 experts over 4: fine
    config.batch_size = 12  # the batch splits over data x fsdp x expert = 8
    with pytest.raises(config_validation.ConfigError, match="8 data-parallel devices"):
        config_validation.validate(config, num_devices=8)
    config = fashion_mnist_mlp.get_config()
    config.model.moe_num_experts = 4
    with pytest.raises(config_validation.ConfigError, match="model.moe_num_experts") as error:
        config_validation.validate(config, num_devices=1)
    assert "not a field of the 'mlp' model" in str(error.value)


# ---------------------------------------------------------------------------- training


def _tiny_run(**model):
    """One SGD step (lr 0.1, no clipping or decay) of the sharding tests' tiny GPT with the
    MoE fields `model`, through experiment.build_run on one device: (metrics, new params,
    initial params, model, batch)."""
    import sharded_driver

    import experiment

    config = sharded_driver.tiny_config(
        "gpt", mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, model=model
    )
    config.grad_clip_norm = config.weight_decay = config.b1 = 0.0
    config.dataset = "synthetic"
    run = experiment.build_run(config, devices=jax.devices()[:1])
    batch = next(run.datasets.train_batches())
    state = run.init_state()
    initial = jax.device_get(state.params)
    with run.compiled.context():
        new_state, metrics = run.compiled.train_step(state, run.compiled.put_train_batch(batch))
    return jax.device_get(metrics), jax.device_get(new_state.params), initial, run.model, batch


SHARDED_MOE = {"moe_num_experts": 8, "moe_top_k": 2, "moe_hidden_dim": 32}


def test_losses_enter_the_objective_and_are_logged() -> None:
    """train_step adds the sown losses to the objective: with coefficients (a, z) the SGD update
    differs from the one without by exactly -lr * the gradient of what the model sows; the
    logged loss stays the cross-entropy; the loads, entropy and losses are logged."""
    lr = 0.1
    off, params_off, initial, model, batch = _tiny_run(
        **SHARDED_MOE, moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0
    )
    on, params_on, _, model_on, _ = _tiny_run(
        **SHARDED_MOE, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.05
    )
    assert "moe_aux_loss" not in off and "moe_z_loss" not in off
    np.testing.assert_allclose(on["loss"], off["loss"], rtol=1e-6)
    assert sum(on[f"moe_load_e{i:02d}"] for i in range(8)) == pytest.approx(1.0)
    assert 0 < on["moe_router_entropy"] <= np.log(8) + 1e-6

    def sown_terms(params):
        _, sown = model_on.apply(
            {"params": params}, batch["inputs"], train=True, mutable=[models.LOSSES]
        )
        terms = steps.sown_scalars(sown[models.LOSSES])
        return sum(total for total, _ in terms.values()), {k: t for k, (t, _) in terms.items()}

    (_, values), grads = jax.jit(jax.value_and_grad(sown_terms, has_aux=True))(initial)
    np.testing.assert_allclose(on["moe_aux_loss"], values["moe_aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(on["moe_z_loss"], values["moe_z_loss"], rtol=1e-5)
    assert on["moe_aux_loss"] >= 0.5 * 0.99  # >= coefficient x 1 (the balanced minimum)
    jax.tree.map(
        lambda a, b, g: np.testing.assert_allclose(a - b, -lr * g, atol=2e-7),
        params_on,
        params_off,
        grads,
    )


def test_moe_cpu_trains_and_the_commands_work_on_its_run(tmp_path) -> None:
    """configs/moe_cpu.py (at its own size, on Tiny Shakespeare, 60 steps) lowers the training
    and validation loss and logs its router's statistics; sampling and evaluate.py work on the
    run unchanged (decoding with dropless dispatch), and so does serve.py's batching engine; the
    Hugging Face GPT-2 export refuses it with the reason."""
    import evaluate
    import experiment
    import sampling
    import train
    from configs import moe_cpu
    from hf import exporting
    from hf.gpt2_files import HFConvertError
    from runtime import metrics_writer
    from serving.engine import LMEngine, Sequence

    config = moe_cpu.get_config()
    config.num_train_steps = config.decay_steps = 60
    config.warmup_steps = 5
    config.log_every_steps = config.eval_every_steps = 20
    config.checkpoint_every_steps = 60
    config.eval_steps = 4
    config.sample_every_eval = False
    config.async_checkpointing = False
    workdir = str(tmp_path / "moe")
    final = train.train_and_evaluate(config, workdir)
    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert losses[0] > losses[1] > losses[2], losses
    assert val[0] > val[-1] and val[-1] < 2.9, val
    logged = (
        rows[-1]
        if "train/moe_aux_loss" in rows[-1]
        else [r for r in rows if "train/moe_aux_loss" in r][-1]
    )
    experts = config.model.moe_num_experts
    assert sum(logged[f"train/moe_load_e{i:02d}"] for i in range(experts)) == pytest.approx(1.0)
    assert "train/moe_router_entropy" in logged and "train/moe_z_loss" in logged
    model_fields = {k: v for k, v in config.model.items() if k != "name"}
    assert final["num_params"] == num_params(GPT(**{**model_fields, "vocab_size": 65}))

    restored = experiment.restore_run(workdir)
    prompt = jnp.zeros((1, 1), jnp.int32)
    tokens = sampling.generate(
        restored.model, restored.params, prompt, jax.random.key(0), 20, 0.8, top_k=10
    )
    assert tokens.shape == (1, 21)
    report = evaluate.evaluate_checkpoint(workdir, output=str(tmp_path / "report"))
    assert np.isfinite(report["loss"]) and report["loss"] < 2.9
    # serve.py's engine: slots decoded together through their KV caches.
    engine = LMEngine(restored.model, restored.params, restored.tokenizer, 2, 4)
    engine.warm_up()
    engine.start()
    done, texts = threading.Event(), []

    def on_update(text: str, finish_reason: str | None) -> None:
        texts.append(text)
        if finish_reason is not None:
            done.set()

    prompt_ids = np.asarray(restored.tokenizer.encode("ROMEO:"), np.int32)
    sequence = Sequence(prompt_ids, 12, 0.8, 0, 1.0, 1, (), on_update, stream=False)
    engine.submit([sequence])
    assert done.wait(300) and len(sequence.token_ids) == 12, texts
    engine.stop(60)
    with pytest.raises(HFConvertError, match="moe_num_experts=8 .Mixture-of-Experts") as error:
        exporting.export_hf(workdir, str(tmp_path / "hf"))
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- expert parallelism

EP_MESHES = {
    "expert4_data2": {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4},
    "expert2_fsdp2_tensor2": {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2},
    "expert8": {"data": 1, "fsdp": 1, "tensor": 1, "expert": 8},
}
# The experts' kernels [8, 64, 32] as each layout's first device holds them.
EP_SHARDS = {
    "expert4_data2": (2, 64, 32),
    "expert2_fsdp2_tensor2": (4, 32, 16),
    "expert8": (1, 64, 32),
}


def test_expert_parallel_training_matches_one_device(tmp_path) -> None:
    """MoE training (dropless, the default; and capacity-based over expert=4 x data=2) on 8
    simulated devices as expert=4 x data=2, expert=2 x fsdp=2 x tensor=2 and expert=8 gives
    one device's losses and final parameters (float tolerance), each device holding its
    experts' share; the expert=4 x data=2 checkpoint restores onto one device and evaluates to
    the same report."""
    import sharded_driver
    from test_sharding import run_driver

    import train

    corpus = sharded_driver.write_corpus(str(tmp_path / "corpus.txt"))
    capacity = {**SHARDED_MOE, "moe_dispatch": "capacity"}
    runs = {name: (mesh, SHARDED_MOE) for name, mesh in EP_MESHES.items()}
    runs["capacity_expert4_data2"] = (EP_MESHES["expert4_data2"], capacity)
    cases = [
        {
            "kind": "train",
            "name": name,
            "model": "gpt",
            "corpus": corpus,
            "workdir": str(tmp_path / name),
            "overrides": {"mesh_shape": mesh, "model": model},
        }
        for name, (mesh, model) in runs.items()
    ]
    cases.append(
        {
            "kind": "evaluate",
            "name": "restored",
            "workdir": str(tmp_path / "expert4_data2"),
            "output": str(tmp_path / "report"),
        }
    )
    wait = run_driver(cases, timeout=2400)
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    for name, model in (("one", SHARDED_MOE), ("capacity_one", capacity)):
        config = sharded_driver.tiny_config("gpt", corpus, mesh_shape=one, model=model)
        train.train_and_evaluate(config, str(tmp_path / name))
    results = wait()
    for name in runs:
        reference = "capacity_one" if name.startswith("capacity") else "one"
        sharded_driver.assert_same_run(str(tmp_path / name), str(tmp_path / reference), name)
    for name, shard in EP_SHARDS.items():
        kernel = results[name]["params"]["h_0/moe/fc/kernel"]
        assert kernel["shape"] == [8, 64, 32] and tuple(kernel["shard"]) == shard, (name, kernel)
    restored = results["restored"]
    assert restored["mesh"]["expert"] == 4
    assert restored["one_device"]["loss"] == pytest.approx(restored["report"]["loss"], rel=1e-5)


def test_expert_parallel_collectives() -> None:
    """What XLA compiles for the train step over expert=4 x data=2 (8 simulated devices):
    capacity dispatch moves tokens with all-to-alls (the partitioner's, from the logical
    constraints); dropless dispatch all-gathers tokens and reduce-scatters the experts' outputs
    over the expert axis (its shard_map)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "collectives"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["capacity"]["all-to-all"] > 0, counts
    assert counts["dropless"]["all-gather"] > 0 and counts["dropless"]["reduce-scatter"] > 0, counts


def _collectives() -> dict[str, dict[str, int]]:
    """{dispatch: {collective: how many in the compiled train step}} over expert=4 x data=2."""
    import sharded_driver

    import experiment

    counts = {}
    for dispatch in moe.DISPATCHES:
        config = sharded_driver.tiny_config(
            "gpt",
            mesh_shape={"data": 2, "fsdp": 1, "tensor": 1, "expert": 4},
            model={**SHARDED_MOE, "moe_dispatch": dispatch},
            dataset="synthetic",
        )
        run = experiment.build_run(config)
        batch = run.compiled.abstract_batch(
            np.zeros((1, 16), np.int32), config.batch_size, "lm", train=True
        )
        with run.compiled.context():
            hlo = run.compiled.train_step.lower(run.abstract_state, batch).compile().as_text()
        counts[dispatch] = {
            op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
            for op in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")
        }
    return counts


if __name__ == "__main__" and sys.argv[1:] == ["collectives"]:
    print(json.dumps(_collectives()))
