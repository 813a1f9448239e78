"""GPT-2's weights in jaxlab's GPT layout and back, and which jaxlab GPTs GPT-2 can express.

Layouts (E = n_embd, H = n_head, D = E / H, I = n_inner or 4E, V = vocabulary, P = positions):

    Hugging Face GPT-2 (Conv1D weights are [in, out])   jaxlab GPT (models/gpt.py)
    wte.weight [V, E]                                  wte/embedding [V padded, E] (tied head)
    wpe.weight [P, E]                                  wpe [P, E]
    h.i.ln_1.weight, .bias [E]                         h_i/ln_1/scale, bias
    h.i.attn.c_attn.weight [E, 3E] (q | k | v)         h_i/attn/{query,key,value}/kernel [E, H, D]
    h.i.attn.c_attn.bias [3E]                          h_i/attn/{query,key,value}/bias [H, D]
    h.i.attn.c_proj.weight [E, E], .bias [E]           h_i/attn/out/kernel [H, D, E], bias [E]
    h.i.ln_2.weight, .bias [E]                         h_i/ln_2/scale, bias
    h.i.mlp.c_fc.weight [E, I], .bias [I]              h_i/mlp/fc/kernel [E, I], bias [I]
    h.i.mlp.c_proj.weight [I, E], .bias [E]            h_i/mlp/proj/kernel [I, E], bias [E]
    ln_f.weight, .bias [E]                             ln_f/scale, bias

Each fused c_attn column block holds its H heads one after another (D columns each), as
GPT2Attention's `_split_heads` reads them. GPT-2's activation 'gelu_new' is the tanh
approximation (jaxlab's mlp_activation='gelu_tanh'); 'gelu' is exact GELU in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf.gpt2_files import EXPORT_ACTIVATIONS, GPT2Shape, HFConvertError


def hf_to_jaxlab(
    weights: dict[str, np.ndarray], shape: GPT2Shape, vocab_rows: int
) -> dict[str, Any]:
    """GPT-2 weights (canonical keys, see the module docstring) -> jaxlab GPT params, unrolled
    layout (h_0 ... h_{L-1}), float32 numpy. The embedding wte/embedding [vocab_rows, E] holds
    the file's first `vocab_rows` rows and zero rows after them: `vocab_rows` (at least
    `shape.vocab_size`, the tokenizer's tokens) may cut a file whose embedding is padded beyond
    its tokenizer (those rows are never a token's) or pad one (never scored either way)."""
    e, h, d = shape.n_embd, shape.n_head, shape.head_dim
    if vocab_rows < shape.vocab_size:
        raise ValueError(f"vocab_rows={vocab_rows} < the vocabulary's {shape.vocab_size} tokens.")
    wte = weights["wte.weight"][:vocab_rows]
    pad = np.zeros((vocab_rows - wte.shape[0], e), wte.dtype)
    params: dict[str, Any] = {
        "wte": {"embedding": np.concatenate([wte, pad]) if pad.size else wte},
        "wpe": weights["wpe.weight"],
        "ln_f": {"scale": weights["ln_f.weight"], "bias": weights["ln_f.bias"]},
    }
    for n in range(shape.n_layer):
        w = lambda name, n=n: weights[f"h.{n}.{name}"]  # noqa: E731
        qkv_kernel = np.split(w("attn.c_attn.weight"), 3, axis=1)  # [E, E] each: q | k | v
        qkv_bias = np.split(w("attn.c_attn.bias"), 3)
        attn = {
            name: {
                "kernel": np.ascontiguousarray(kernel.reshape(e, h, d)),
                "bias": bias.reshape(h, d),
            }
            for name, kernel, bias in zip(
                ("query", "key", "value"), qkv_kernel, qkv_bias, strict=True
            )  # fmt: skip
        }
        attn["out"] = {
            "kernel": w("attn.c_proj.weight").reshape(h, d, e),
            "bias": w("attn.c_proj.bias"),
        }
        params[f"h_{n}"] = {
            "ln_1": {"scale": w("ln_1.weight"), "bias": w("ln_1.bias")},
            "attn": attn,
            "ln_2": {"scale": w("ln_2.weight"), "bias": w("ln_2.bias")},
            "mlp": {
                "fc": {"kernel": w("mlp.c_fc.weight"), "bias": w("mlp.c_fc.bias")},
                "proj": {"kernel": w("mlp.c_proj.weight"), "bias": w("mlp.c_proj.bias")},
            },
        }
    return params


def jaxlab_to_hf(params: dict[str, Any], shape: GPT2Shape) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_jaxlab`: unrolled jaxlab GPT params -> GPT-2 weights (canonical
    keys), the embedding cut to the real vocabulary. Raises HFConvertError naming the
    parameters GPT-2 has no place for (every jaxlab parameter must land somewhere)."""
    from flax import traverse_util

    e = shape.n_embd
    used: set[tuple[str, ...]] = set()

    def get(*path: str) -> np.ndarray:
        used.add(path)
        node: Any = params
        for part in path:
            node = node[part]
        return np.asarray(node)

    out = {
        "wte.weight": get("wte", "embedding")[: shape.vocab_size],
        "wpe.weight": get("wpe"),
        "ln_f.weight": get("ln_f", "scale"),
        "ln_f.bias": get("ln_f", "bias"),
    }
    for n in range(shape.n_layer):
        b = f"h_{n}"
        names = ("query", "key", "value")
        out.update(
            {
                f"h.{n}.ln_1.weight": get(b, "ln_1", "scale"),
                f"h.{n}.ln_1.bias": get(b, "ln_1", "bias"),
                f"h.{n}.attn.c_attn.weight": np.concatenate(
                    [get(b, "attn", q, "kernel").reshape(e, e) for q in names], axis=1
                ),
                f"h.{n}.attn.c_attn.bias": np.concatenate(
                    [get(b, "attn", q, "bias").reshape(e) for q in names]
                ),
                f"h.{n}.attn.c_proj.weight": get(b, "attn", "out", "kernel").reshape(e, e),
                f"h.{n}.attn.c_proj.bias": get(b, "attn", "out", "bias"),
                f"h.{n}.ln_2.weight": get(b, "ln_2", "scale"),
                f"h.{n}.ln_2.bias": get(b, "ln_2", "bias"),
                f"h.{n}.mlp.c_fc.weight": get(b, "mlp", "fc", "kernel"),
                f"h.{n}.mlp.c_fc.bias": get(b, "mlp", "fc", "bias"),
                f"h.{n}.mlp.c_proj.weight": get(b, "mlp", "proj", "kernel"),
                f"h.{n}.mlp.c_proj.bias": get(b, "mlp", "proj", "bias"),
            }
        )
    unused = sorted("/".join(p) for p in traverse_util.flatten_dict(params) if p not in used)
    if unused:
        raise HFConvertError(f"the run has parameters GPT-2 has no place for: {unused[:5]}.")
    expected = shape.tensor_shapes()
    for key, value in out.items():
        if value.shape != expected[key]:  # a model whose fields disagree with its parameters
            raise HFConvertError(f"{key}: the run's array is {value.shape}, GPT-2 of this "
                                 f"config needs {expected[key]}.")  # fmt: skip
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def gpt2_refusals(model: Any, tokenizer: Any) -> list[str]:
    """Why a jaxlab model (and tokenizer) is not expressible as Hugging Face GPT-2; [] if it
    is. GPT-2 is: learned absolute positions, LayerNorm with biases, multi-head attention with
    biases, a 2-layer exact- or tanh-GELU MLP with biases, an output tied to the embedding, and
    a byte-level BPE tokenizer."""
    from models import gpt

    if not isinstance(model, gpt.GPT):
        return [f"it is a {type(model).__name__}, not a GPT"]
    reasons = []
    checks = [
        (model.position_embedding == "learned",
         f"position_embedding={model.position_embedding!r} (GPT-2 learns absolute positions)"),
        (model.tie_embeddings,
         "tie_embeddings=False (GPT-2's output layer is its token embedding)"),
        (model.norm == "layernorm",
         f"norm={model.norm!r} (GPT-2 uses LayerNorm)"),
        (model.mlp_activation in EXPORT_ACTIVATIONS,
         f"mlp_activation={model.mlp_activation!r} (GPT-2's MLP is "
         "Dense-GELU-Dense: 'gelu' or 'gelu_tanh')"),
        (model.num_kv_heads in (None, model.num_heads),
         f"num_kv_heads={model.num_kv_heads} (GPT-2 has one key/value head "
         "per query head)"),
        (not model.qk_norm, "qk_norm=True (GPT-2 has no query/key norm)"),
        (model.attn_logit_softcap is None,
         "attn_logit_softcap is set (GPT-2 does not cap attention logits)"),
        (model.use_bias, "use_bias=False (every GPT-2 layer has biases)"),
        (tokenizer is not None and tokenizer.kind == "bpe",
         f"its tokenizer is {tokenizer.describe() if tokenizer else 'missing'} (a GPT-2 "
         "directory needs a byte-level BPE: config.tokenizer='bpe' or a tokenizer.json)"),
    ]  # fmt: skip
    for ok, reason in checks:
        if not ok:
            reasons.append(reason)
    return reasons


def gpt2_shape_of(model: Any) -> GPT2Shape:
    """The GPT-2 shape of an exportable jaxlab GPT."""
    hidden = model.mlp_hidden_dim or model.mlp_ratio * model.embed_dim
    return GPT2Shape(
        vocab_size=model.vocab_size,
        n_positions=model.block_size,
        n_embd=model.embed_dim,
        n_layer=model.num_layers,
        n_head=model.num_heads,
        n_inner=hidden,
        activation_function=EXPORT_ACTIVATIONS[model.mlp_activation],
        layer_norm_epsilon=float(model.norm_epsilon),
    )
