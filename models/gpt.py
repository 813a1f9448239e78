"""GPT-2-style decoder-only transformer (nanoGPT's model.py in Flax Linen), with a KV cache, and
the variants papers ablate as fields of the one model (defaults: GPT-2): LayerNorm or RMSNorm,
QK-norm, GELU / tanh-GELU / SwiGLU / squared-ReLU MLPs, multi-head, grouped-query or multi-query
attention, attention-logit soft-capping, biases, tied or untied output embedding and a padded
vocabulary. docs/models.md has the table of fields and their sources. What the model costs
(its exact parameter count, training FLOPs per token for MFU) is models/gpt_flops.py,
re-exported here."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import LOSSES, METRICS, PARAM_UPDATES, ModelConfigError, moe

# The attention layer and its parts (models/attention.py), importable from here as before.
from models.attention import (  # noqa: F401
    ATTENTION_IMPLS,
    CausalSelfAttention,
    HeadsDense,
    TokenPositions,
    apply_rope,
    plain_attention,
)
from models.context_parallel import STRATEGIES as CONTEXT_PARALLEL
from models.context_parallel import in_sequence_order, sequence_axis, to_balanced_layout

# The model's cost (models/gpt_flops.py), importable from here: the registry looks up
# `training_flops_per_token` in the model file (tools/bench.py's MFU).
from models.gpt_flops import (  # noqa: F401
    flops_per_token,
    non_embedding_params,
    num_params,
    training_flops_per_token,
)
from models.layers import logical_normal as _normal
from models.layers import logical_zeros as _zeros
from models.layers import norm_layer as _norm
from models.layers import padded_vocab_size

NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "relu2")
# What a block keeps for the backward pass (JAX's checkpoint policies): everything ('none': no
# remat), nothing ('full'), every matmul output ('dots_saveable', attention's [heads x L x L]
# scores included, which dominate at long sequences), or the matmuls without batch dimensions
# only: the projections' outputs, not attention's score or value products (JAX's
# dots_with_no_batch_dims_saveable; MaxText's 'minimal').
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPTConfigError(ModelConfigError):
    """A GPT field has a value the model cannot use; the message names the field and the fix
    (config_validation reports it as a ConfigError: one ERROR line)."""


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The hyperparameters that a block and its layers share; GPT builds it from its fields."""

    num_heads: int
    num_kv_heads: int  # key/value heads (== num_heads: multi-head; 1: multi-query)
    block_size: int  # the context length: the KV cache's size
    mlp_hidden_dim: int
    mlp_activation: str  # one of MLP_ACTIVATIONS
    norm: str  # one of NORMS
    norm_epsilon: float
    qk_norm: bool  # RMSNorm over head_dim of queries and keys
    attn_logit_softcap: float | None
    residual_init_std: float  # std of the projections into the residual stream (GPT-2)
    use_bias: bool
    rope: bool  # rotary position embeddings on queries and keys
    attention_impl: str  # one of ATTENTION_IMPLS
    dropout_rate: float
    decode: bool  # append to the KV cache (sampling)
    dtype: jnp.dtype  # compute dtype
    moe: moe.MoEConfig | None = None  # the sparse layers' settings (None: a dense model)
    context_parallel: str = "all_gather"  # one of CONTEXT_PARALLEL (models/context_parallel.py)


class FeedForward(nn.Module):
    """Position-wise MLP: Dense(mlp_hidden_dim) ('fc') -> activation -> Dense(embed) ('proj')
    -> dropout. Activations: 'gelu' exact (nanoGPT's nn.GELU()), 'gelu_tanh' (GPT-2's tanh
    approximation, Hendrycks & Gimpel 2016), 'relu2' (squared ReLU, So et al. 2021, Primer),
    'swiglu' (Shazeer 2020: silu(x W_gate) * (x W_fc), then proj; Llama's)."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies the position-wise feed-forward network to x[batch, length, embed]."""
        c = self.config
        batch, length, embed_dim = x.shape
        flat = sequence_axis()[1] == 1  # 2-D matmuls (see HeadsDense) unless sequences are split
        x = x.reshape(batch * length, embed_dim) if flat else x

        def dense(features: int, axes: tuple[str, str], std: float, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=c.use_bias,
                dtype=c.dtype,
                kernel_init=_normal(std, axes),
                bias_init=_zeros(axes[1:]),
                name=name,
            )

        h = dense(c.mlp_hidden_dim, ("embed", "mlp"), 0.02, "fc")(x)
        if c.mlp_activation == "swiglu":
            h = nn.silu(dense(c.mlp_hidden_dim, ("embed", "mlp"), 0.02, "gate")(x)) * h
        elif c.mlp_activation == "relu2":
            h = jnp.square(nn.relu(h))
        else:
            h = nn.gelu(h, approximate=c.mlp_activation == "gelu_tanh")
        h = nn.with_logical_constraint(h, ("batch", "mlp") if flat else ("batch", "length", "mlp"))
        h = dense(embed_dim, ("mlp", "embed"), c.residual_init_std, "proj")(h)
        h = h.reshape(batch, length, embed_dim)
        return nn.Dropout(c.dropout_rate, deterministic=not train)(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `sparse=True` the MLP is a Mixture-of-Experts layer ('moe', models/moe.py), plus a
    dense 'shared_mlp' of the shared experts' total width when config.moe asks for them
    (DeepSeekMoE's always-on experts). With `scan_step=True` it returns (x, None), the
    (carry, output) pair of an `nn.scan` step.
    """

    config: BlockConfig
    scan_step: bool = False
    sparse: bool = False

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, positions: jnp.ndarray, train: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, None]:
        """Applies one block to x[batch, length, embed]; positions[length] are absolute."""
        c = self.config
        attn = CausalSelfAttention(c, name="attn")
        ln_1 = _norm(c.norm, c.norm_epsilon, c.use_bias, c.dtype, "ln_1")
        x = x + attn(ln_1(x), positions, train)
        ln_2 = _norm(c.norm, c.norm_epsilon, c.use_bias, c.dtype, "ln_2")
        h = ln_2(x)
        if not self.sparse:
            x = x + FeedForward(c, name="mlp")(h, train)
        else:
            x = x + moe.MoEFeedForward(c.moe, name="moe")(h, train)
            if c.moe.shared_hidden_dim:
                shared = dataclasses.replace(c, mlp_hidden_dim=c.moe.shared_hidden_dim)
                x = x + FeedForward(shared, name="shared_mlp")(h, train)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scan_step else x


def scanned_blocks(
    config: BlockConfig, num_layers: int, remat_policy: str | None, name: str, sparse: bool = False
):
    """`num_layers` blocks (`sparse`: Mixture-of-Experts blocks) as one `nn.scan` over a stack
    of their parameters (and KV caches, and what they sow while training):
    each parameter gets a leading logical 'layers' axis (left unsharded by sharding.py's
    rules), so the compiled program holds one block whatever the depth. Each layer draws its
    own parameter and dropout randomness. `remat_policy` (a REMAT_POLICIES value, None for no
    rematerialisation) applies to each step. Call the result with (x, positions, train)."""
    block = Block
    if remat_policy is not None:
        # static_argnums counts `self`: (self, x, positions, train) -> train is 3. Under scan,
        # common subexpression elimination cannot undo the rematerialisation: no prevent_cse.
        block = nn.remat(block, policy=remat_policy, static_argnums=(3,), prevent_cse=False)
    scan = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0, LOSSES: 0, METRICS: 0, PARAM_UPDATES: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),  # positions and train: the same for every layer
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(config, scan_step=True, sparse=sparse, name=name)


class GPT(nn.Module):
    """GPT-2 language model: tokens[batch, length] -> float32 logits[batch, length, vocab_size].

    With `decode=True` each call appends its tokens to a KV cache in the 'cache' collection
    (create it with `init`, e.g. via `sampling.init_cache`) and positions continue from the
    cache index; call with `mutable=['cache']`.

    The blocks are parameters `h_0` ... `h_{L-1}`, unrolled in the compiled program; with
    `scan_layers=True` they are one `nn.scan` (`scanned_blocks`) whose parameters and KV cache
    are stacked in `h` with a leading [num_layers] axis: the same function (`stack_layers`
    converts unrolled parameters), compiled in a time that does not grow with depth. The two
    layouts' checkpoints do not restore into each other.

    The variant fields (docs/models.md) default to GPT-2: with them at their defaults the
    parameters, their names and the function are today's GPT-2. Parameter names of the
    variants: RMSNorm keeps the norms' names (ln_1, ln_2, ln_f; a `scale` only); QK-norm adds
    attn/query_norm and attn/key_norm (`scale` [head_dim]); SwiGLU adds mlp/gate beside mlp/fc
    (up) and mlp/proj (down); grouped-query attention gives attn/key and attn/value kernels
    [embed, num_kv_heads, head_dim]; an untied output adds lm_head/kernel [embed, padded vocab].
    A sparse block (moe_num_experts > 0) has h_i/moe (router/kernel [embed, E], router/bias [E],
    fc, gate, proj/kernel [E, ...]) and h_i/shared_mlp in place of h_i/mlp; with scan_layers
    the first moe_first_dense blocks are stacked in `h_dense`, the sparse ones in `h`.
    """

    vocab_size: int = 65
    block_size: int = 256
    num_layers: int = 6
    num_heads: int = 6
    embed_dim: int = 384
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    use_bias: bool = True
    position_embedding: str = "learned"
    # Variants (docs/models.md); the defaults are GPT-2's.
    norm: str = "layernorm"  # 'layernorm' or 'rmsnorm'
    norm_epsilon: float = 1e-5
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys
    mlp_activation: str = "gelu"  # 'gelu' (exact), 'gelu_tanh', 'swiglu', 'relu2'
    mlp_hidden_dim: int | None = None  # None: mlp_ratio * embed_dim
    num_kv_heads: int | None = None  # None: num_heads (multi-head); 1: multi-query
    attn_logit_softcap: float | None = None  # cap * tanh(scores / cap); None: off
    tie_embeddings: bool = True  # False: a separate lm_head kernel [embed, vocab]
    vocab_pad_multiple: int = 1  # embedding rows rounded up to a multiple of this
    attention_impl: str = "auto"
    remat_policy: str = "none"
    scan_layers: bool = False  # the blocks as one nn.scan over stacked parameters
    # Attention across a sequence split over the `context` mesh axis: 'all_gather' or 'ring'.
    context_parallel: str = "all_gather"
    # Mixture-of-Experts (models/moe.py, docs/models.md); moe_num_experts=0: every MLP dense.
    moe_num_experts: int = 0  # routed experts per sparse layer
    moe_top_k: int = 2  # experts per token
    moe_hidden_dim: int | None = None  # each expert's width; None: the dense MLP's
    moe_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each moe_hidden_dim wide
    moe_layer_freq: int = 1  # every n-th block sparse (after the first dense ones)
    moe_first_dense: int = 0  # the first k blocks stay dense (DeepSeek)
    moe_router: str = "softmax"  # 'softmax' (Switch, Mixtral) or 'sigmoid' (DeepSeek-V3)
    moe_norm_topk: bool = False  # renormalise the top-k gate weights to sum 1
    moe_dispatch: str = "dropless"  # 'dropless' (sort + ragged_dot) or 'capacity' (GShard)
    moe_capacity_factor: float = 1.25  # capacity dispatch: slots per expert, x k*length/E
    moe_aux_loss_coef: float = 0.01  # Switch Transformer's load-balancing loss
    moe_z_loss_coef: float = 0.001  # ST-MoE's router z-loss
    moe_bias_update_rate: float = 0.0  # > 0: DeepSeek-V3's aux-loss-free balancing bias
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jnp.ndarray,
        train: bool = False,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Returns next-token logits (float32) for every position of tokens[batch, length]:
        [batch, length, vocab_size], the real vocabulary only (padding rows are never scored).
        Packed documents (data/text_windows.py) give int32 positions [batch, length] (each
        document from 0) and segment_ids [batch, length] (attention stays in a document);
        None: positions 0, 1, ... (after the cache's, decoding) and one stream.

        Raises GPTConfigError (a ValueError) for an invalid field, ValueError for a sequence
        longer than block_size."""
        self.check_fields()
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"Sequence length {length} exceeds block_size {self.block_size}.")

        start = 0
        if self.decode:
            initialized = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                start = index.value
                index.value = start + length
        if positions is None:
            positions = start + jnp.arange(length, dtype=jnp.int32)
        # Context parallelism: the sequence in its load-balanced layout (models/context_parallel.py)
        tokens, positions = to_balanced_layout(
            tokens, TokenPositions(positions, segment_ids), self.decode
        )

        vocab_rows = padded_vocab_size(self.vocab_size, self.vocab_pad_multiple)
        wte = nn.Embed(
            vocab_rows,
            self.embed_dim,
            dtype=self.dtype,
            embedding_init=_normal(0.02, ("vocab", "embed")),
            name="wte",
        )
        x = wte(tokens)
        if self.position_embedding == "learned":
            wpe = self.param(
                "wpe", _normal(0.02, (None, "embed")), (self.block_size, self.embed_dim)
            )
            pos_emb = jnp.take(wpe, positions.positions, axis=0).astype(self.dtype)
            x = x + (pos_emb if pos_emb.ndim == 3 else pos_emb[None])
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        remat = self.remat_policy != "none" and not self.decode
        config = self.block_config()
        k = self.moe_first_dense if self.moe_num_experts else 0
        if self.scan_layers:  # MoE: the first k (dense) blocks in 'h_dense', the sparse in 'h'
            policy = REMAT_POLICIES[self.remat_policy] if remat else None
            segments = (("h_dense", k, False), ("h", self.num_layers - k, self.moe_num_experts > 0))
            for name, n, sparse in segments:
                if n:
                    x, _ = scanned_blocks(config, n, policy, name, sparse)(x, positions, train)
        else:
            block = Block
            if remat:
                # static_argnums counts `self`: (self, x, positions, train) -> train is 3.
                block = nn.remat(
                    Block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(3,)
                )
            for i in range(self.num_layers):
                sparse = self.moe_num_experts > 0 and moe.is_sparse_layer(
                    i, self.moe_first_dense, self.moe_layer_freq
                )
                x = block(config, sparse=sparse, name=f"h_{i}")(x, positions, train)

        x = in_sequence_order(x, self.decode)
        x = _norm(self.norm, self.norm_epsilon, self.use_bias, self.dtype, "ln_f")(x)
        # A 2-D matmul (see HeadsDense), unless sequences are split over devices.
        flat = x.reshape(-1, x.shape[-1]) if sequence_axis()[1] == 1 else x
        if self.tie_embeddings:  # the output projection is the token embedding (GPT-2)
            logits = wte.attend(flat)
        else:
            logits = nn.Dense(
                vocab_rows,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_normal(0.02, ("embed", "vocab")),
                name="lm_head",
            )(flat)
        logits = logits.reshape(x.shape[:2] + (-1,))
        # Constrained at the padded width (which the tensor axis divides when the padding is
        # chosen for it), then sliced: the padding rows are never sampled or scored.
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits[..., : self.vocab_size].astype(jnp.float32)

    def block_config(self) -> BlockConfig:
        """The hyperparameters every block of this model shares (what Block, CausalSelfAttention
        and FeedForward are built from)."""
        return BlockConfig(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            block_size=self.block_size,
            mlp_hidden_dim=(
                self.mlp_ratio * self.embed_dim
                if self.mlp_hidden_dim is None
                else self.mlp_hidden_dim
            ),
            mlp_activation=self.mlp_activation,
            norm=self.norm,
            norm_epsilon=self.norm_epsilon,
            qk_norm=self.qk_norm,
            attn_logit_softcap=self.attn_logit_softcap,
            residual_init_std=0.02 / math.sqrt(2 * self.num_layers),
            use_bias=self.use_bias,
            rope=self.position_embedding == "rope",
            attention_impl=self.attention_impl,
            context_parallel=self.context_parallel,
            dropout_rate=self.dropout_rate,
            decode=self.decode,
            dtype=self.dtype,
            moe=self.moe_config(),
        )

    def moe_config(self) -> moe.MoEConfig | None:
        """The sparse layers' settings from the moe_* fields (None for a dense model)."""
        if not self.moe_num_experts:
            return None
        dense_width = self.mlp_hidden_dim or self.mlp_ratio * self.embed_dim
        width = self.moe_hidden_dim or dense_width
        return moe.MoEConfig(
            num_experts=self.moe_num_experts,
            top_k=self.moe_top_k,
            hidden_dim=width,
            shared_hidden_dim=self.moe_shared_experts * width,
            activation=self.mlp_activation,
            router=self.moe_router,
            norm_topk=self.moe_norm_topk,
            dispatch=self.moe_dispatch,
            capacity_factor=self.moe_capacity_factor,
            aux_loss_coef=self.moe_aux_loss_coef,
            z_loss_coef=self.moe_z_loss_coef,
            bias_update_rate=self.moe_bias_update_rate,
            num_sparse_layers=moe.num_sparse_layers(self),
            residual_init_std=0.02 / math.sqrt(2 * self.num_layers),
            dropout_rate=self.dropout_rate,
            decode=self.decode,
            dtype=self.dtype,
        )

    def check_fields(self) -> None:
        """Raises GPTConfigError (a models.ModelConfigError) naming the field and the fix, for
        unknown options or inconsistent shapes. Called by every forward pass, and by
        config_validation before anything compiles (models/__init__.py's contract)."""
        choices = {
            "position_embedding": ("learned", "rope"),
            "attention_impl": ATTENTION_IMPLS,
            "context_parallel": CONTEXT_PARALLEL,
            "remat_policy": tuple(REMAT_POLICIES),
            "norm": NORMS,
            "mlp_activation": MLP_ACTIVATIONS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise GPTConfigError(
                    f"model.{field}={getattr(self, field)!r}; use one of {allowed}."
                )
        if self.embed_dim % self.num_heads:
            raise GPTConfigError(
                f"model.embed_dim={self.embed_dim} is not divisible by "
                f"model.num_heads={self.num_heads}."
            )
        if self.position_embedding == "rope" and (self.embed_dim // self.num_heads) % 2:
            raise GPTConfigError(
                "model.position_embedding='rope' needs an even head_dim (embed_dim // "
                f"num_heads = {self.embed_dim // self.num_heads}); change model.embed_dim or "
                "model.num_heads."
            )
        kv = self.num_kv_heads
        if kv is not None and (kv < 1 or self.num_heads % kv):
            raise GPTConfigError(
                f"model.num_kv_heads={kv} must be a positive divisor of model.num_heads="
                f"{self.num_heads} (1: multi-query; None: multi-head)."
            )
        if self.mlp_hidden_dim is not None and self.mlp_hidden_dim < 1:
            raise GPTConfigError(
                f"model.mlp_hidden_dim={self.mlp_hidden_dim} must be positive (or None: "
                "mlp_ratio * embed_dim)."
            )
        if not self.norm_epsilon > 0:
            raise GPTConfigError(f"model.norm_epsilon={self.norm_epsilon} must be positive.")
        cap = self.attn_logit_softcap
        if cap is not None and not cap > 0:
            raise GPTConfigError(
                f"model.attn_logit_softcap={cap} must be positive (e.g. 50.0), or None for off."
            )
        if cap is not None and self.attention_impl == "cudnn":
            raise GPTConfigError(
                "model.attn_logit_softcap needs the explicit attention: set "
                "model.attention_impl='plain' or 'auto' (cuDNN's kernel has no soft cap)."
            )
        if self.vocab_pad_multiple < 1:
            raise GPTConfigError(
                f"model.vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1 (1: no padding)."
            )
        moe.check_fields(self)  # the moe_* fields (a moe.MoEConfigError)


def stack_layers(params: dict, num_layers: int, first_dense: int = 0) -> dict:
    """Unrolled GPT parameters (h_0 ... h_{L-1}) in the scan_layers layout: one `h` whose arrays
    have a leading [num_layers] axis or, for an MoE model with `first_dense` > 0
    (model.moe_first_dense), its first `first_dense` (dense) blocks stacked in `h_dense` and the
    sparse rest in `h`. The other parameters are kept as they are.

    Raises:
        ValueError: a block h_i (i < num_layers) is missing, or `first_dense` is not in
            [0, num_layers).
    """
    names = [f"h_{i}" for i in range(num_layers)]
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"stack_layers: no {missing[:3]} among the parameters {sorted(params)}.")
    if not 0 <= first_dense < num_layers:
        raise ValueError(f"stack_layers: first_dense={first_dense} must be in [0, {num_layers}).")
    rest = {k: v for k, v in params.items() if k not in set(names)}

    def stacked(blocks: list[str]) -> Any:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[params[name] for name in blocks])

    if first_dense:
        rest["h_dense"] = stacked(names[:first_dense])
    return {**rest, "h": stacked(names[first_dense:])}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: scan_layers parameters (`h`, and an MoE model's `h_dense`,
    whose blocks come first) in the unrolled layout h_0 ... h_{L-1}."""
    segments = [params[name] for name in ("h_dense", "h") if name in params]
    rest = {k: v for k, v in params.items() if k not in ("h_dense", "h")}
    layers, index = {}, 0
    for stacked in segments:
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            layers[f"h_{index}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
            index += 1
    return {**rest, **layers}


# The registry (models/__init__.py) finds this file by its name: config.model.name = "gpt".
Model = GPT
TASK = "lm"
