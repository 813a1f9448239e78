"""GPT-2-style decoder-only transformer (nanoGPT's model.py in Flax Linen), with a KV cache."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "plain")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def _normal(std: float, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
    """Normal(0, std) initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
    """Zeros initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


def _layer_norm(use_bias: bool, dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over `embed` with GPT-2's epsilon, scale 1 and bias 0."""
    return nn.LayerNorm(
        epsilon=1e-5,
        use_bias=use_bias,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


class HeadsDense(nn.Module):
    """A dense layer to or from a (heads, head_dim) pair of axes: an einsum over a kernel kept
    in its true shape. (Flax's DenseGeneral initialises a flattened kernel, which clashes with
    sharding constraints on the logical axis names.)"""

    equation: str  # e.g. 'ble,ehd->blhd' (in) or 'blhd,hde->ble' (out)
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    std: float
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies the projection (and bias) in the compute dtype."""
        kernel = self.param("kernel", _normal(self.std, self.kernel_axes), self.kernel_shape)
        # Batch and length merged into one axis ('bl' -> 'l'): XLA:CPU then computes the weight
        # gradient as a plain matmul instead of through a slow transposing copy
        # (docs/performance.md).
        batch, length = x.shape[:2]
        flat = x.reshape((batch * length,) + x.shape[2:]).astype(self.dtype)
        y = jnp.einsum(self.equation.replace("b", ""), flat, kernel.astype(self.dtype))
        y = y.reshape((batch, length) + y.shape[1:])
        if self.use_bias:
            bias_shape = y.shape[-len(self.bias_axes) :]
            y = y + self.param("bias", _zeros(self.bias_axes), bias_shape).astype(self.dtype)
        return y


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (rotate-half form) of x[batch, length, heads, head_dim]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [length, half]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def plain_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray
) -> jnp.ndarray:
    """Explicit softmax(q k^T / sqrt(d) + mask) v on [batch, length, heads, head_dim] arrays."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The hyperparameters that a block and its layers share; GPT builds it from its fields."""

    num_heads: int
    block_size: int  # the context length: the KV cache's size
    mlp_ratio: int
    residual_init_std: float  # std of the projections into the residual stream (GPT-2)
    use_bias: bool
    rope: bool  # rotary position embeddings on queries and keys
    attention_impl: str  # one of ATTENTION_IMPLS
    dropout_rate: float
    decode: bool  # append to the KV cache (sampling)
    dtype: jnp.dtype  # compute dtype


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; in decode mode keys/values accumulate in the 'cache'."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Attends each position of x[batch, length, embed] to itself and earlier positions."""
        c = self.config
        batch, length, embed_dim = x.shape
        head_dim = embed_dim // c.num_heads
        qkv_axes = ("batch", "length", "heads", "kv")
        q, k, v = (
            nn.with_logical_constraint(
                HeadsDense(
                    "ble,ehd->blhd",
                    (embed_dim, c.num_heads, head_dim),
                    ("embed", "heads", "kv"),
                    ("heads", "kv"),
                    std=0.02,
                    use_bias=c.use_bias,
                    dtype=c.dtype,
                    name=name,
                )(x),
                qkv_axes,
            )
            for name in ("query", "key", "value")
        )
        if c.rope:
            q, k = apply_rope(q, positions), apply_rope(k, positions)

        impl = c.attention_impl
        if impl == "auto" and jax.default_backend() == "cpu":
            # XLA:CPU has no fused kernel; the explicit einsum form is faster there
            # (docs/performance.md).
            impl = "plain"
        mask = jnp.tril(jnp.ones((length, length), bool))
        is_causal = True
        if c.decode:
            # Keys/values of every position so far; `init` only creates the (empty) cache.
            initialized = self.has_variable("cache", "cached_key")
            cache_shape = (batch, c.block_size, c.num_heads, head_dim)
            cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, v.dtype)
            if initialized:
                start = (0, positions[0], 0, 0)
                cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
                cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
                k, v = cached_k.value, cached_v.value
                mask = jnp.arange(c.block_size)[None, :] <= positions[:, None]
                is_causal = False
                if impl == "cudnn":  # an explicit mask over the cache: let XLA handle decoding
                    impl = "xla"

        if impl == "plain":
            y = plain_attention(q, k, v, mask[None, None])
        else:
            y = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=None if is_causal else mask[None, None],
                is_causal=is_causal,
                implementation=None if impl == "auto" else impl,
            )
        y = nn.with_logical_constraint(y, qkv_axes)
        y = HeadsDense(
            "blhd,hde->ble",
            (c.num_heads, head_dim, embed_dim),
            ("heads", "kv", "embed"),
            ("embed",),
            std=c.residual_init_std,
            use_bias=c.use_bias,
            dtype=c.dtype,
            name="out",
        )(y)
        return nn.Dropout(c.dropout_rate, deterministic=not train)(y)


class FeedForward(nn.Module):
    """Dense(mlp_ratio * embed) -> exact GELU (nanoGPT's nn.GELU()) -> Dense(embed) -> dropout."""

    config: BlockConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies the position-wise feed-forward network to x[batch, length, embed]."""
        c = self.config
        batch, length, embed_dim = x.shape
        x = x.reshape(batch * length, embed_dim)  # 2-D matmuls: see HeadsDense
        h = nn.Dense(
            c.mlp_ratio * embed_dim,
            use_bias=c.use_bias,
            dtype=c.dtype,
            kernel_init=_normal(0.02, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            name="fc",
        )(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=False), ("batch", "mlp"))
        h = nn.Dense(
            embed_dim,
            use_bias=c.use_bias,
            dtype=c.dtype,
            kernel_init=_normal(c.residual_init_std, ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="proj",
        )(h).reshape(batch, length, embed_dim)
        return nn.Dropout(c.dropout_rate, deterministic=not train)(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    With `scan_step=True` it returns (x, None), the (carry, output) pair of an `nn.scan` step.
    """

    config: BlockConfig
    scan_step: bool = False

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, positions: jnp.ndarray, train: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, None]:
        """Applies one block to x[batch, length, embed]; positions[length] are absolute."""
        c = self.config
        attn = CausalSelfAttention(c, name="attn")
        x = x + attn(_layer_norm(c.use_bias, c.dtype, "ln_1")(x), positions, train)
        mlp = FeedForward(c, name="mlp")
        x = x + mlp(_layer_norm(c.use_bias, c.dtype, "ln_2")(x), train)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scan_step else x


def scanned_blocks(config: BlockConfig, num_layers: int, remat_policy: str | None, name: str):
    """`num_layers` blocks as one `nn.scan` over a stack of their parameters (and KV caches):
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
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),  # positions and train: the same for every layer
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(config, scan_step=True, name=name)


class GPT(nn.Module):
    """GPT-2 language model: tokens[batch, length] -> float32 logits[batch, length, vocab].

    With `decode=True` each call appends its tokens to a KV cache in the 'cache' collection
    (create it with `init`, e.g. via `sampling.init_cache`) and positions continue from the
    cache index; call with `mutable=['cache']`.

    The blocks are parameters `h_0` ... `h_{L-1}`, unrolled in the compiled program; with
    `scan_layers=True` they are one `nn.scan` (`scanned_blocks`) whose parameters and KV cache
    are stacked in `h` with a leading [num_layers] axis: the same function (`stack_layers`
    converts unrolled parameters), compiled in a time that does not grow with depth. The two
    layouts' checkpoints do not restore into each other.
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
    attention_impl: str = "auto"
    remat_policy: str = "none"
    scan_layers: bool = False  # the blocks as one nn.scan over stacked parameters
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Returns next-token logits (float32) for every position of tokens[batch, length]."""
        self._check_config()
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
        positions = start + jnp.arange(length, dtype=jnp.int32)

        wte = nn.Embed(
            self.vocab_size,
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
            x = x + jnp.take(wpe, positions, axis=0).astype(self.dtype)[None]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        remat = self.remat_policy != "none" and not self.decode
        config = BlockConfig(
            num_heads=self.num_heads,
            block_size=self.block_size,
            mlp_ratio=self.mlp_ratio,
            residual_init_std=0.02 / math.sqrt(2 * self.num_layers),
            use_bias=self.use_bias,
            rope=self.position_embedding == "rope",
            attention_impl=self.attention_impl,
            dropout_rate=self.dropout_rate,
            decode=self.decode,
            dtype=self.dtype,
        )
        if self.scan_layers:
            policy = REMAT_POLICIES[self.remat_policy] if remat else None
            x, _ = scanned_blocks(config, self.num_layers, policy, name="h")(x, positions, train)
        else:
            block = Block
            if remat:
                # static_argnums counts `self`: (self, x, positions, train) -> train is 3.
                block = nn.remat(
                    Block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(3,)
                )
            for i in range(self.num_layers):
                x = block(config, name=f"h_{i}")(x, positions, train)

        x = _layer_norm(self.use_bias, self.dtype, "ln_f")(x)
        # Output projection tied to the token embedding, as a 2-D matmul (see HeadsDense).
        logits = wte.attend(x.reshape(-1, x.shape[-1])).reshape(x.shape[:2] + (-1,))
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)

    def _check_config(self) -> None:
        """Raises ValueError for unknown options or inconsistent shapes."""
        if self.position_embedding not in ("learned", "rope"):
            raise ValueError(
                f"position_embedding={self.position_embedding!r}; use 'learned' or 'rope'."
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}; use one of {tuple(REMAT_POLICIES)}."
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}."
            )
        if self.position_embedding == "rope" and (self.embed_dim // self.num_heads) % 2:
            raise ValueError("rope needs an even head_dim (embed_dim // num_heads).")


def num_params(model: GPT) -> int:
    """Exact parameter count of `model` (the token embedding is tied to the output)."""
    e, hidden, b = model.embed_dim, model.mlp_ratio * model.embed_dim, int(model.use_bias)
    layer_norm = e + b * e
    attention = 4 * (e * e + b * e)  # query, key, value, out
    mlp = (e * hidden + b * hidden) + (hidden * e + b * e)
    block = 2 * layer_norm + attention + mlp
    return model.vocab_size * e + _position_params(model) + model.num_layers * block + layer_norm


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled GPT parameters (h_0 ... h_{L-1}) in the scan_layers layout (one `h` whose
    arrays have a leading [num_layers] axis); the other parameters are kept as they are."""
    layers = [params[f"h_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if k not in {f"h_{i}" for i in range(num_layers)}}
    return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: scan_layers parameters in the unrolled layout."""
    stacked = params["h"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    layers = {f"h_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
    return {**rest, **layers}


def _position_params(model: GPT) -> int:
    """Size of the learned position table (none with rotary positions)."""
    return model.block_size * model.embed_dim if model.position_embedding == "learned" else 0


def non_embedding_params(model: GPT) -> int:
    """nanoGPT's convention: num_params minus the position table (wte counts, being the head)."""
    return num_params(model) - _position_params(model)


def flops_per_token(
    n_params_non_embedding: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM appendix B, as in nanoGPT's estimate_mfu)."""
    return 6.0 * n_params_non_embedding + 12.0 * num_layers * num_heads * head_dim * seq_len


def training_flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token of `model` on sequences of `seq_len` tokens: `flops_per_token`
    with nanoGPT's non-embedding parameter count (what MFU figures are computed from)."""
    n = non_embedding_params(model)
    head_dim = model.embed_dim // model.num_heads
    return flops_per_token(n, model.num_layers, model.num_heads, head_dim, seq_len)


# The registry (models/__init__.py) finds this file by its name: config.model.name = "gpt".
Model = GPT
TASK = "lm"
