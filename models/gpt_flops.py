"""What a GPT (models/gpt.py) costs: its exact parameter count and its training FLOPs per token,
from which the benchmark and the GPU check compute MFU. Arithmetic on the model's fields only:
nothing here builds or runs the model. Not a model file (it defines no `Model`): models/gpt.py
re-exports these functions, so `models.gpt.training_flops_per_token` is the model's formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.layers import padded_vocab_size

if TYPE_CHECKING:  # the model imports this module: no import back at run time
    from models.gpt import GPT


def num_params(model: GPT, active: bool = False) -> int:
    """Exact parameter count of `model`, as initialised, for every variant; with `active`,
    the parameters one token uses (a Mixture-of-Experts layer's routed experts count top_k
    of num_experts; the same as the total for a dense model).

    Per block: two norms (scale, plus bias for LayerNorm with use_bias); attention with
    query and out [embed, heads * head_dim], key and value [embed, kv_heads * head_dim] (and
    their biases), QK-norm scales 2 * head_dim; an MLP of 2 (SwiGLU: 3) matrices of embed x
    hidden (and biases). A sparse block (models/moe.py) has instead the router [embed, E]
    (and its selection bias [E]), E experts of 2 (SwiGLU: 3) bias-free matrices embed x
    expert hidden, and the shared experts' MLP (a dense MLP of their total width, with
    biases as use_bias says). Plus the final norm, the token embedding [padded vocab, embed],
    the learned position table [block_size, embed] (not with rope) and an untied lm_head
    [embed, padded vocab] (no bias).
    """
    c = model.block_config()  # the resolved widths: kv heads and MLP hidden units
    e, b = model.embed_dim, int(model.use_bias)
    heads, kv_heads, hidden = c.num_heads, c.num_kv_heads, c.mlp_hidden_dim
    head_dim = e // heads
    vocab = padded_vocab_size(model.vocab_size, model.vocab_pad_multiple)
    norm = e + (b * e if model.norm == "layernorm" else 0)
    attention = (
        (e * heads * head_dim + b * heads * head_dim)  # query
        + 2 * (e * kv_heads * head_dim + b * kv_heads * head_dim)  # key, value
        + (heads * head_dim * e + b * e)  # out
        + (2 * head_dim if model.qk_norm else 0)  # query_norm, key_norm
    )
    up_matrices = 2 if model.mlp_activation == "swiglu" else 1  # fc (and gate)

    def mlp(width: int, bias: int) -> int:
        return up_matrices * (e * width + bias * width) + (width * e + bias * e) if width else 0

    block = 2 * norm + attention + mlp(hidden, b)
    blocks = model.num_layers * block
    m = c.moe
    if m is not None:  # the sparse blocks' MoE layer in place of their MLP
        experts = m.top_k if active else m.num_experts
        router = e * m.num_experts + (m.num_experts if m.bias_update_rate > 0 else 0)
        sparse = router + experts * mlp(m.hidden_dim, 0) + mlp(m.shared_hidden_dim, b)
        blocks += m.num_sparse_layers * (sparse - mlp(hidden, b))
    head = 0 if model.tie_embeddings else e * vocab
    return vocab * e + _position_params(model) + blocks + norm + head


def _position_params(model: GPT) -> int:
    """Size of the learned position table (none with rotary positions)."""
    return model.block_size * model.embed_dim if model.position_embedding == "learned" else 0


def non_embedding_params(model: GPT, active: bool = False) -> int:
    """nanoGPT's convention: num_params minus the position table. The token embedding counts
    when it is tied (it is then the output projection's matrix, a matmul per token); with an
    untied lm_head the input embedding (a table lookup) does not count and lm_head does.
    `active`: the parameters one token uses (num_params's)."""
    untied_input = 0
    if not model.tie_embeddings:
        untied_input = padded_vocab_size(model.vocab_size, model.vocab_pad_multiple)
        untied_input *= model.embed_dim
    return num_params(model, active) - _position_params(model) - untied_input


def flops_per_token(
    n_params_non_embedding: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM appendix B, as in nanoGPT's estimate_mfu)."""
    return 6.0 * n_params_non_embedding + 12.0 * num_layers * num_heads * head_dim * seq_len


def training_flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token of `model` on sequences of `seq_len` tokens: `flops_per_token`
    with nanoGPT's non-embedding parameter count (what MFU figures are computed from).

    It follows the variant through N: grouped-query attention's smaller key/value matrices,
    SwiGLU's three matrices, an untied lm_head (the input table, a lookup, is not counted) and
    the padded vocabulary rows the head multiplies. The attention term 12·L·H·Q·T counts the
    query heads (each computes its own scores, whatever the key/value heads); norms, QK-norm
    and soft-capping are elementwise and left out, as nanoGPT leaves out LayerNorm.

    A Mixture-of-Experts model counts the parameters a token uses (`active`): its router, its
    top_k routed experts and the shared experts, so MFU is computed on the work the model needs
    (as MaxText and Megatron count MoE FLOPs). Routing itself (top-k, sorting, the capacity
    dispatch's one-hot einsums) is left out like the elementwise work: overhead, not model
    FLOPs.
    """
    n = non_embedding_params(model, active=True)
    head_dim = model.embed_dim // model.num_heads
    return flops_per_token(n, model.num_layers, model.num_heads, head_dim, seq_len)
