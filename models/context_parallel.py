"""Context parallelism for the GPT (models/gpt.py): sequences split over a mesh axis, and causal
attention across the pieces. A helper of the model files, not a model (it defines no `Model`).

The sequence axis of activations has the logical name 'length'; sharding.py's rules map it to
the `context` mesh axis, so with `mesh_shape.context` = N > 1 every layer but attention works on
L / N positions of each sequence per device (XLA partitions it from the logical constraints).
Attention needs every earlier key, and reaches them in one of two ways (`GPT.context_parallel`):

- 'all_gather' (MaxText's default, `context_parallel_strategy='all_gather'`): the keys and
  values of the whole sequence are gathered onto each device over the context axis (by a
  sharding constraint: XLA's all-gather, and a reduce-scatter for their gradients), and each
  device attends its own queries to them, block by block;
- 'ring' (Ring Attention, Liu, Zaharia & Abbeel 2023, arXiv:2310.01889): keys and values stay
  in blocks of L / N that travel around the ring of context devices (`jax.lax.ppermute`), N - 1
  hops; each device attends its queries to the block it holds and merges the partial results
  with an online softmax (Milakov & Gimelshein 2018; the FlashAttention recurrence), so in the
  forward pass no device holds more than two blocks of keys and values. (The backward pass is
  JAX's transpose of that loop: it keeps each step's block as a residual, the whole sequence's
  keys and values of one layer per device, as 'all_gather' does; the paper's own backward pass
  passes them around the ring again instead.)

Both use the causal load-balanced layout (MaxText's `context_parallel_load_balance`,
torchtitan's head-tail balancer; Brandon et al. 2023, Striped Attention, analyse the imbalance
of contiguous chunks): the sequence is cut into 2N chunks and
device i holds chunks i and 2N - 1 - i, one from the start and one from the end, so that under
the causal mask every device has the same work: at each step of the ring a device attends either
all its queries to the first half of the block it holds, or its second chunk's queries to the
whole block (half a block's work, `lax.cond`), and the step with its own block is the diagonal.
The model reorders its input tokens into that layout (`balanced_order`, a gather of int32 ids on
each device) and its last hidden states back (`from_balanced`: two `ppermute`s), so that logits
come out in order, equal to one device's.

Every step is rematerialised (`jax.checkpoint`) in the backward pass: no [L / N x L / N] scores
outlive their step, so attention's memory grows with L per device, not with the L x L / N
scores of an explicit attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

STRATEGIES = ("all_gather", "ring")
SEQUENCE_AXIS = "length"  # the logical name of the sequence axis of activations
_NEG = -1e30  # the running maximum's start: finite, so that exp(_NEG - m) is 0, never NaN
KV_BLOCK = 512  # keys per step of the online softmax within a device's block (`_merge`)


class TokenPositions(NamedTuple):
    """Where each token of a batch is, as GPT hands it to its attention layers (one pytree: it
    passes through nn.scan and nn.remat as one argument).

    positions: int32 [length] (every sequence alike) or [batch, length] (packed documents: each
    restarts at 0), for rotary and learned position embeddings. segment_ids: int32 [batch,
    length], the document of each token (packing: attention stays inside a document, as T5's
    and MaxText's packed inputs), or None (one stream). In the load-balanced layout of context
    parallelism both are in that layout's order."""

    positions: jax.Array
    segment_ids: jax.Array | None = None


def sequence_axis() -> tuple[tuple[str, ...], int]:
    """(mesh axes, number of devices) that split the sequence axis of activations where the
    model is traced: the mesh axes the current logical rules map 'length' to (sharding.py:
    `context`) and the product of their sizes. ((), 1) outside a mesh (`jax.set_mesh`), without
    such a rule (pmap runs without rules), or where the rules leave 'length' whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = nn.logical_to_mesh_axes((SEQUENCE_AXIS,))[0]
    if axes is None:
        return (), 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return axes, math.prod(mesh.shape[a] for a in axes)


def split_sequence(length: int, decode: bool = False) -> tuple[tuple[str, ...], int]:
    """`sequence_axis()` where a sequence of `length` tokens is split over it in the
    load-balanced layout, else ((), 1): cached decoding keeps whole sequences, and a length that
    2 x shards chunks do not divide stays whole (XLA then partitions plain attention, correct
    but without the balanced layout; config_validation refuses such a training length). The
    model and its attention layers decide alike from this one function."""
    axes, shards = sequence_axis()
    if shards == 1 or decode or length % (2 * shards):
        return (), 1
    return axes, shards


def balanced_order(length: int, shards: int) -> np.ndarray:
    """int32 [length]: the positions of a sequence in the load-balanced layout over `shards`
    devices. The sequence is cut into 2 * shards chunks and device i's slice holds chunks i and
    2 * shards - 1 - i, e.g. length 8 over 2 devices: [0 1 6 7 | 2 3 4 5]. `length` must be a
    multiple of 2 * shards."""
    half = length // (2 * shards)
    chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, half)
    order = [np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)]
    return np.concatenate(order)


def to_balanced_layout(
    tokens: jax.Array, positions: TokenPositions, decode: bool = False
) -> tuple[jax.Array, TokenPositions]:
    """tokens [batch, length] and their positions in the load-balanced layout, where
    `split_sequence` splits the sequence (else unchanged): a gather along length of int32 ids,
    local to each device (the batch arrives whole along length)."""
    _, shards = split_sequence(tokens.shape[1], decode)
    if shards == 1:
        return tokens, positions
    order = balanced_order(tokens.shape[1], shards)
    pos, seg = positions
    pos = pos[..., order]  # [length] or [batch, length]
    return tokens[:, order], TokenPositions(pos, None if seg is None else seg[:, order])


def in_sequence_order(x: jax.Array, decode: bool = False) -> jax.Array:
    """x[batch, length, ...] from the load-balanced layout back in sequence order (the inverse
    of `to_balanced_layout`), where `split_sequence` splits it; else x."""
    axes, shards = split_sequence(x.shape[1], decode)
    return x if shards == 1 else from_balanced(x, axes, shards)


def _manual(fn: Callable, axes: tuple[str, ...], in_specs: tuple, out_specs) -> Callable:
    """`fn` under `jax.shard_map`, manual over the context axes only: batch, heads and embed
    keep the shardings XLA gives them from the other axes (data, fsdp, tensor)."""
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes))


def from_balanced(x: jax.Array, axes: tuple[str, ...], shards: int) -> jax.Array:
    """x[batch, length, ...] in the load-balanced layout (`balanced_order`), sharded over the
    context `axes` on length -> the same in sequence order, with the same sharding.

    Device i holds chunks (i, 2N-1-i) and must end with (2i, 2i+1). Chunk 2j comes from device
    2j when that is < N (its first chunk), else from device 2N-1-2j (its second): so every even
    device sends its first chunk and every odd device its second, a permutation of the devices;
    chunk 2j+1 likewise with the roles swapped. Two `ppermute`s of half a shard each."""
    n = shards
    to_first = [(i, i // 2 if i % 2 == 0 else (2 * n - 1 - i) // 2) for i in range(n)]
    to_second = [(i, (i - 1) // 2 if i % 2 else n - 1 - i // 2) for i in range(n)]
    spec = PartitionSpec(None, axes)

    def body(local: jax.Array) -> jax.Array:
        half = local.shape[1] // 2
        first, second = local[:, :half], local[:, half:]
        even = jax.lax.axis_index(axes) % 2 == 0
        a = jax.lax.ppermute(jnp.where(even, first, second), axes, to_first)
        b = jax.lax.ppermute(jnp.where(even, second, first), axes, to_second)
        return jnp.concatenate([a, b], axis=1)

    return _manual(body, axes, (spec,), spec)(x)


# ----------------------------------------------------------------------------- attention


def _scores(q: jax.Array, k: jax.Array, softcap: float | None) -> jax.Array:
    """float32 scores [batch, kv_heads, group, q_len, kv_len] of q[batch, q_len, heads, dim]
    against k[batch, kv_len, kv_heads, dim] (query head h uses key head h // group, as
    models.attention.plain_attention), scaled by 1/sqrt(dim) and soft-capped."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    s = s * (1.0 / math.sqrt(dim))
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


State = tuple[jax.Array, jax.Array, jax.Array]  # output sum, running max, running normaliser


def _merge(
    state: State,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    softcap: float | None,
    block: int | None = None,
) -> State:
    """`_merge_block` over (k, v) in blocks of `block` keys (a scan, each step rematerialised
    in the backward pass), so that at most [q_len x block] scores exist at a time: a device's
    chunk of a long sequence is thousands of keys. One block where `block` (None: KV_BLOCK)
    does not divide."""
    block = KV_BLOCK if block is None else block
    kv_len = k.shape[1]
    if kv_len <= block or kv_len % block:
        return _merge_block(state, q, k, v, mask, softcap)
    n = kv_len // block
    blocks = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, block, *a.shape[2:]), 1, 0)  # noqa: E731
    xs = (blocks(k), blocks(v))
    if mask is not None:  # [b, 1, 1, q_len, kv_len] -> [n, b, 1, 1, q_len, block]
        xs += (jnp.moveaxis(mask.reshape(*mask.shape[:-1], n, block), -2, 0),)

    def step(state: State, x: tuple) -> tuple[State, None]:
        kb, vb, *maskb = x
        return _merge_block(state, q, kb, vb, maskb[0] if maskb else None, softcap), None

    state, _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), state, xs)
    return state


def _merge_block(
    state: State,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    softcap: float | None,
) -> State:
    """The online softmax: folds the attention of q to one block (k, v) into `state`.

    state: o [batch, kv_heads, group, q_len, dim], m and l [batch, kv_heads, group, q_len]
    (float32): the unnormalised output, the largest score so far and the sum of exp(score - m).
    mask: bool broadcastable to [batch, 1, 1, q_len, kv_len] (True: attend) or None (all)."""
    o, m, norm = state
    s = _scores(q, k, softcap)
    if mask is not None:
        s = jnp.where(mask, s, _NEG)
    # The result does not depend on the running maximum (it cancels): no gradient through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    correction = jnp.exp(m - m_new)
    norm = norm * correction + p.sum(axis=-1)
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o * correction[..., None] + pv, m_new, norm


def _same_segment(seg_q: jax.Array | None, seg_kv: jax.Array | None) -> jax.Array | None:
    """bool [batch, 1, 1, q_len, kv_len]: query and key in the same document, or None."""
    if seg_q is None:
        return None
    return (seg_q[:, :, None] == seg_kv[:, None, :])[:, None, None]


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    return b if a is None else a if b is None else a & b


def _local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seg_q: jax.Array | None,
    seg_kv: jax.Array | None,
    *,
    axes: tuple[str, ...],
    shards: int,
    strategy: str,
    softcap: float | None,
) -> jax.Array:
    """One device's causal attention in the load-balanced layout (inside shard_map): q [batch,
    chunk, heads, dim] holds this device's 2 half-chunks (i, 2N-1-i), seg_q their segment ids
    [batch, chunk] (packed documents) or None; k, v [batch, chunk, kv_heads, dim] and seg_kv are
    the same chunks' ('ring'), or the whole sequence's, device after device ('all_gather')."""
    batch, chunk, heads, dim = q.shape
    kv_heads = k.shape[2]
    half = chunk // 2
    me = jax.lax.axis_index(axes)
    if strategy == "all_gather":
        gathered = (k, v) if seg_kv is None else (k, v, seg_kv)
        k, v, *own_seg = (
            jax.lax.dynamic_slice_in_dim(a, me * chunk, chunk, axis=1) for a in gathered
        )
        seg_kv = own_seg[0] if own_seg else None
    shape = (batch, kv_heads, heads // kv_heads, chunk)
    state = (jnp.zeros(shape + (dim,), jnp.float32), jnp.full(shape, _NEG), jnp.zeros(shape))
    # Each device's sums differ: typed so (varying over the context axes) for the scans' carries.
    state = tuple(jax.lax.pcast(a, axes, to="varying") for a in state)

    # Step 0, the diagonal: this device's own keys, causal within the layout (its two chunks
    # are in sequence order, so the lower triangle is exactly the causal mask).
    # Rematerialised in the backward pass (as every step below): no [chunk x chunk] scores kept.
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[None, None, None]
    mask = _and(causal, _same_segment(seg_q, seg_kv))
    state = jax.checkpoint(lambda state: _merge(state, q, k, v, mask, softcap))(state)
    if shards == 1:
        return _finish(state, q.dtype)

    ring = [(i, (i + 1) % shards) for i in range(shards)]

    def step(carry, s):
        state, block = carry
        source = (me - s) % shards  # whose keys this step attends to
        if strategy == "ring":  # the block moves one device on; its owner is me - s
            block = tuple(jax.lax.ppermute(a, axes, ring) for a in block)
            kb, vb, *segb = block
        else:
            kb, vb, *segb = (
                jax.lax.dynamic_slice_in_dim(a, source * chunk, chunk, axis=1) for a in gathered
            )
        seg_b = segb[0] if segb else None

        def earlier(state: State) -> State:  # source < me: all queries, the block's first chunk
            mask = _same_segment(seg_q, None if seg_b is None else seg_b[:, :half])
            return _merge(state, q, kb[:, :half], vb[:, :half], mask, softcap)

        def later(state: State) -> State:  # source > me: my second chunk's queries, all keys
            mask = _same_segment(None if seg_q is None else seg_q[:, half:], seg_b)
            # The query axis is axis 3 of every part of the state.
            tail = tuple(a[:, :, :, half:] for a in state)
            merged = _merge(tail, q[:, half:], kb, vb, mask, softcap)
            return tuple(
                jnp.concatenate([a[:, :, :, :half], b], axis=3)
                for a, b in zip(state, merged, strict=True)
            )

        state = jax.lax.cond(source < me, earlier, later, state)
        return (state, block), None

    block = (k, v) if seg_kv is None else (k, v, seg_kv)
    if strategy == "all_gather":
        block = ()  # the blocks are sliced from the gathered arrays
    # The saved residuals of the scan are each step's carry (a block and the running sums).
    body = jax.checkpoint(step, prevent_cse=False)
    (state, _), _ = jax.lax.scan(body, (state, block), jnp.arange(1, shards))
    return _finish(state, q.dtype)


def _finish(state: State, dtype: jnp.dtype) -> jax.Array:
    """The normalised output [batch, q_len, heads, dim] in `dtype` of an online-softmax state."""
    o, _, norm = state
    y = o / norm[..., None]  # every query attends at least to itself: norm > 0
    batch, kv_heads, group, q_len, dim = y.shape
    return y.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, kv_heads * group, dim).astype(dtype)


def context_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    axes: tuple[str, ...],
    shards: int,
    strategy: str,
    softcap: float | None = None,
    kv_names: tuple[str | None, ...] = ("batch", SEQUENCE_AXIS, None, None),
) -> jax.Array:
    """Causal (and, with segment ids, block-diagonal) attention of sequences split over the
    context `axes` of `shards` devices, in the load-balanced layout (`balanced_order`).

    q [batch, length, heads, dim]; k, v [batch, length, kv_heads, dim] (kv_heads dividing heads:
    grouped-query attention); segment_ids int32 [batch, length] (a token attends only to tokens
    of its own segment) or None; all in the balanced layout and sharded over `axes` on length.
    strategy: 'all_gather' or 'ring' (STRATEGIES); softcap as models.attention.plain_attention.
    kv_names: the logical axis names of k and v ('all_gather' keeps every axis but length so).
    Scores, softmax and sums in float32; returns [batch, length, heads, dim] in q's dtype, equal
    to plain_attention's with the causal mask up to float32 rounding."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context parallel strategy {strategy!r}: use one of {STRATEGIES}.")
    split, kv_spec = PartitionSpec(None, axes), PartitionSpec(None, axes)
    if strategy == "all_gather":
        # XLA gathers the keys and values over the context axes from a sharding constraint
        # that keeps their other axes as they were (batch and heads stay split).
        whole = (kv_names[0], None) + tuple(kv_names[2:])
        k, v = (nn.with_logical_constraint(a, whole) for a in (k, v))
        kv_spec = PartitionSpec()
    fn = lambda q, k, v, *seg: _local_attention(  # noqa: E731
        q, k, v, *(seg if seg else (None, None)),
        axes=axes, shards=shards, strategy=strategy, softcap=softcap,
    )  # fmt: skip
    args, specs = (q, k, v), (split, kv_spec, kv_spec)
    if segment_ids is not None:
        args, specs = args + (segment_ids, segment_ids), specs + (split, kv_spec)
    return _manual(fn, axes, specs, split)(*args)
