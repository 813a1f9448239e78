"""Mixture-of-Experts feed-forward layers of the GPT (models/gpt.py): the router, the two ways of
dispatching tokens to experts, the experts, and the router's auxiliary losses and statistics.
A helper of the model files, not a model (it defines no `Model`); docs/models.md has the fields
and their sources.

A sparse layer replaces the block's MLP by E experts (MLPs of width `hidden_dim`, stacked into
kernels [E, embed, hidden] whose first axis has the logical name 'expert'); a router scores every
token against every expert and sends it to its top k:
- router 'softmax' (Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020;
  Mixtral, Jiang et al. 2024): p = softmax(x W_r), gate weights p[top-k], renormalised to sum 1
  over the top k with `norm_topk` (Mixtral's softmax over the top-k logits is the same);
- router 'sigmoid' (DeepSeek-V3, DeepSeek-AI 2024, section 2.1.2): s = sigmoid(x W_r), gate
  weights s[top-k] (normalised over the top k with `norm_topk`, as DeepSeek-V3 does). With
  `bias_update_rate` > 0 (either router) the experts are chosen by s + b, where b is a
  per-expert bias that the gradient never touches: after every step b_i += rate *
  sign(mean load - load_i) (DeepSeek-V3's auxiliary-loss-free balancing; rate 0.001 there).

Dispatch:
- 'dropless' (the default; MegaBlocks, Gale et al. 2023): the (token, expert) assignments are
  sorted by expert and multiplied with grouped matmuls (`jax.lax.ragged_dot`), so every token
  reaches all its k experts whatever the load: no capacity to tune, no token lost, and the
  result does not depend on which other tokens share the batch (so cached decoding equals the
  full forward pass). On TPU and GPU ragged_dot is a grouped matmul; XLA:CPU has none and jax
  computes it densely over the groups (E times the experts' FLOPs), which the CPU configs'
  8 small experts afford.
- 'capacity' (GShard; Switch): each sequence is a group whose tokens may place at most
  C = ceil(k * length * capacity_factor / E) assignments on each expert, the first choices of
  all tokens before the second choices (GShard's priority); an assignment past C is dropped and
  its token keeps only the residual stream (and any shared experts). The dispatch and combine
  are einsums with a one-hot [group, length, E, C] tensor: GShard's formulation, which XLA's
  partitioner turns into all-to-alls between the devices that hold the experts.

Losses (sown into models.LOSSES while training, averaged over the sparse layers so that a
coefficient means the same at any depth, as MegaBlocks and OLMoE do):
- load balancing (Switch Transformer eq. 4, with DeepSeek's top-k normalisation):
  aux_loss_coef * E * sum_i f_i P_i, f_i the fraction of the N*k assignments that go to expert
  i, P_i the mean router probability of expert i (for the sigmoid router, scores normalised to
  sum 1 per token); 1 * coef when perfectly balanced, E * coef when one expert takes all;
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): z_loss_coef * mean_t (logsumexp_j x_tj)^2.
Metrics (models.METRICS): the fraction of assignments each expert receives (moe_load_e00, ...),
the router's mean entropy (nats) and, for capacity dispatch, the fraction of assignments dropped.

Expert parallelism: see `dropless_experts` (jax.shard_map, all-gather / reduce-scatter of the
tokens over the 'expert' mesh axes) and `capacity_experts` (logical sharding constraints; XLA
inserts the all-to-alls).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from models import LOSSES, METRICS, PARAM_UPDATES, ModelConfigError
from models.layers import logical_normal, logical_zeros, mlp_activation

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")


class MoEConfigError(ModelConfigError):
    """An MoE field of the GPT has a value the model cannot use (one line naming the field)."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """What a sparse feed-forward layer needs; models.gpt.GPT builds it from its moe_* fields."""

    num_experts: int  # E routed experts
    top_k: int  # experts per token
    hidden_dim: int  # each expert's hidden width
    shared_hidden_dim: int  # the shared experts' total width (0: none), a dense MLP
    activation: str  # models.layers.mlp_activation's kind ('swiglu': a third kernel, gate)
    router: str  # one of ROUTERS
    norm_topk: bool  # gate weights renormalised over the top k
    dispatch: str  # one of DISPATCHES
    capacity_factor: float
    aux_loss_coef: float
    z_loss_coef: float
    bias_update_rate: float  # > 0: DeepSeek-V3's selection bias and its update
    num_sparse_layers: int  # the losses are averaged over these
    residual_init_std: float  # std of the output projection (GPT-2's scaled init)
    dropout_rate: float
    decode: bool  # cached decoding: always dropless
    dtype: Any  # compute dtype


def is_sparse_layer(layer: int, first_dense: int, layer_freq: int) -> bool:
    """Whether block `layer` (0-based) of an MoE model is sparse: the first `first_dense` blocks
    stay dense (DeepSeek's first_k_dense_replace), then every `layer_freq`-th block is sparse,
    counted so that the last of each run of `layer_freq` is (Qwen-MoE's decoder_sparse_step and
    Llama 4's interleave_moe_layer_step: 2 -> blocks 1, 3, 5, ...; 1 -> every block)."""
    return layer >= first_dense and (layer - first_dense + 1) % layer_freq == 0


def check_fields(model: Any) -> None:
    """Raises MoEConfigError naming the field and the fix for an MoE field of a GPT (`model`)
    that cannot work; nothing when model.moe_num_experts == 0 (dense)."""
    e = model.moe_num_experts
    if e < 0:
        raise MoEConfigError(f"model.moe_num_experts={e} must be >= 0 (0: dense feed-forwards).")
    if e == 0:
        return
    k = model.moe_top_k
    if not 1 <= k <= e:
        raise MoEConfigError(
            f"model.moe_top_k={k} must be between 1 and model.moe_num_experts={e}."
        )
    for field, allowed in (("moe_router", ROUTERS), ("moe_dispatch", DISPATCHES)):
        if getattr(model, field) not in allowed:
            raise MoEConfigError(f"model.{field}={getattr(model, field)!r}; use one of {allowed}.")
    if model.moe_hidden_dim is not None and model.moe_hidden_dim < 1:
        raise MoEConfigError(
            f"model.moe_hidden_dim={model.moe_hidden_dim} must be positive (or None: the dense "
            "MLP's width)."
        )
    if not model.moe_capacity_factor > 0:
        raise MoEConfigError(
            f"model.moe_capacity_factor={model.moe_capacity_factor} must be > 0 (1.25: Switch "
            "Transformer's training value)."
        )
    for field in ("moe_shared_experts", "moe_aux_loss_coef", "moe_z_loss_coef",
                  "moe_bias_update_rate"):  # fmt: skip
        if getattr(model, field) < 0:
            raise MoEConfigError(f"model.{field}={getattr(model, field)} must be >= 0.")
    if model.moe_layer_freq < 1:
        raise MoEConfigError(
            f"model.moe_layer_freq={model.moe_layer_freq} must be >= 1 (1: every layer sparse)."
        )
    if not 0 <= model.moe_first_dense < model.num_layers:
        raise MoEConfigError(
            f"model.moe_first_dense={model.moe_first_dense} must be in [0, model.num_layers="
            f"{model.num_layers}): at least one layer must be sparse."
        )
    if num_sparse_layers(model) == 0:
        raise MoEConfigError(
            f"model.moe_layer_freq={model.moe_layer_freq} leaves no sparse layer among "
            f"{model.num_layers - model.moe_first_dense} (num_layers - moe_first_dense)."
        )
    if model.scan_layers and model.moe_layer_freq != 1:
        raise MoEConfigError(
            f"model.moe_layer_freq={model.moe_layer_freq} needs model.scan_layers=False (a scan "
            "repeats one block; dense-then-sparse via model.moe_first_dense scans)."
        )


def num_sparse_layers(model: Any) -> int:
    """How many blocks of `model` (a GPT) are sparse."""
    if model.moe_num_experts == 0:
        return 0
    layers = range(model.num_layers)
    return sum(is_sparse_layer(i, model.moe_first_dense, model.moe_layer_freq) for i in layers)


class Routing(NamedTuple):
    """A router's decision for N tokens: experts int32 [N, k], gate weights float32 [N, k], the
    normalised router probabilities float32 [N, E] (what the balancing loss and the entropy
    read) and the logits float32 [N, E] (the z-loss's)."""

    experts: jax.Array
    weights: jax.Array
    probs: jax.Array
    logits: jax.Array


def route(
    logits: jax.Array, bias: jax.Array | None, top_k: int, router: str, norm_topk: bool
) -> Routing:
    """Top-k routing of float32 logits [N, E] (the module docstring): softmax or sigmoid scores;
    experts chosen by score (+ `bias` [E], which only selects: DeepSeek-V3); gate weights the
    chosen scores, renormalised over the k when `norm_topk`."""
    if router == "softmax":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    select = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    experts = _top_k_indices(select, top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights, probs, logits)


def _top_k_indices(scores: jax.Array, k: int) -> jax.Array:
    """The indices int32 [N, k] of the k largest of scores [N, E] per row, largest first (ties:
    the lower index first), as jax.lax.top_k's; as k argmaxes, which XLA's partitioner keeps
    split over the tokens where it gathers every token for a TopK (XLA:CPU's at least)."""
    chosen = []
    for _ in range(k):
        index = jnp.argmax(scores, axis=-1)
        chosen.append(index)
        taken = jax.nn.one_hot(index, scores.shape[-1], dtype=jnp.bool_)
        scores = jnp.where(taken, -jnp.inf, scores)
    return jnp.stack(chosen, axis=-1).astype(jnp.int32)


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
    """float32 [E]: the fraction of the assignments experts int32 [N, k] that go to each expert
    (sums to 1)."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
    return counts / experts.size


def load_balancing_loss(routing: Routing) -> jax.Array:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4) for top-k routing:
    E * sum_i f_i * P_i, f_i the fraction of the N*k assignments to expert i, P_i the mean
    router probability of expert i over the N tokens. 1 when balanced; float32 scalar."""
    num_experts = routing.probs.shape[-1]
    f = expert_load(routing.experts, num_experts)
    p = jnp.mean(routing.probs, axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of
    logsumexp(logits)^2, for logits float32 [N, E]; float32 scalar."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def router_entropy(probs: jax.Array) -> jax.Array:
    """Mean over tokens of the entropy (nats) of the router's probabilities [N, E]."""
    return jnp.mean(jnp.sum(jax.scipy.special.entr(probs), axis=-1))


def capacity(group_size: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard's expert capacity per group: ceil(k * group_size * capacity_factor / E), >= 1."""
    return max(1, math.ceil(top_k * group_size * capacity_factor / num_experts))


def capacity_masks(
    experts: jax.Array, weights: jax.Array, num_experts: int, cap: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GShard's dispatch and combine tensors for groups of S tokens routed to experts int32
    [G, S, k] with gate weights float32 [G, S, k]: an assignment takes the next free slot
    (0 .. cap-1) of its expert in its group, all first choices before any second choice (GShard
    Algorithm 1's priority); one past `cap` is dropped. Returns (dispatch float32
    [G, S, E, cap], 1 where a token sits in a slot; combine float32 [G, S, E, cap], the gate
    weight there; kept bool [G, S, k])."""
    groups, size, k = experts.shape
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    by_choice = onehot.transpose(0, 2, 1, 3).reshape(groups, k * size, num_experts)
    slot = (jnp.cumsum(by_choice, axis=1) - 1).reshape(groups, k, size, num_experts)
    slot = jnp.sum(slot.transpose(0, 2, 1, 3) * onehot, axis=-1)  # [G, S, k]
    kept = slot < cap
    where = onehot * kept[..., None]  # [G, S, k, E]
    slots = jax.nn.one_hot(slot, cap, dtype=jnp.float32)  # [G, S, k, cap] (zeros past cap)
    dispatch = jnp.einsum("gske,gskc->gsec", where.astype(jnp.float32), slots)
    combine = jnp.einsum("gske,gskc->gsec", where * weights[..., None], slots)
    return dispatch, combine, kept


def capacity_experts(
    x: jax.Array,
    routing: Routing,
    kernels: dict[str, jax.Array],
    config: MoEConfig,
) -> tuple[jax.Array, jax.Array]:
    """Capacity-based dispatch (GShard, Switch) of x [G, S, embed] (each sequence a group) to
    the experts `kernels` ('fc', 'proj', and 'gate' for SwiGLU: [E, embed, hidden] /
    [E, hidden, embed]); returns (the experts' combined output [G, S, embed] in x's dtype,
    0 for dropped assignments; kept bool [G, S, k]).

    Expert parallelism by the compiler, as GShard does it: the expert inputs [E, G, C, embed]
    are constrained to 'expert' x 'batch_no_expert', while tokens arrive split over the batch
    axes, the 'expert' mesh axis among them: XLA moves each token to its expert's device with
    an all-to-all, and back after the experts (tested in tests/test_moe.py)."""
    groups, size, embed = x.shape
    c = config
    cap = capacity(size, c.top_k, c.num_experts, c.capacity_factor)
    experts = routing.experts.reshape(groups, size, c.top_k)
    weights = routing.weights.reshape(groups, size, c.top_k)
    dispatch, combine, kept = capacity_masks(experts, weights, c.num_experts, cap)
    # The masks are built where the tokens are (split over the batch axes, the expert axis
    # among them); the expert inputs are split over the experts instead: an all-to-all.
    local = ("batch", "length", None, None)
    dispatch = nn.with_logical_constraint(dispatch, local)
    combine = nn.with_logical_constraint(combine, local)
    dispatched = ("expert", "batch_no_expert", None, "embed")
    inputs = jnp.einsum("gsec,gsm->egcm", dispatch.astype(c.dtype), x)
    inputs = nn.with_logical_constraint(inputs, dispatched)

    def matmul(h: jax.Array, name: str) -> jax.Array:
        return jnp.einsum("egcm,emh->egch", h, kernels[name].astype(c.dtype))

    h = matmul(inputs, "fc")
    gate = matmul(inputs, "gate") if "gate" in kernels else None
    h = mlp_activation(c.activation, h, gate)
    h = nn.with_logical_constraint(h, ("expert", "batch_no_expert", None, "mlp"))
    out = matmul(h, "proj")
    out = nn.with_logical_constraint(out, dispatched)
    y = jnp.einsum("gsec,egcm->gsm", combine.astype(c.dtype), out)
    return y, kept


def grouped_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    kernels: dict[str, jax.Array],
    activation: str,
    first_expert: jax.Array | int = 0,
) -> jax.Array:
    """Dropless experts on one device: the weighted sum over its k experts of each token of
    x [n, embed] routed to experts int32 [n, k] with gate weights [n, k], for the experts
    first_expert .. first_expert + E_local - 1 whose kernels are given ([E_local, embed, hidden]
    / [E_local, hidden, embed], in x's dtype); assignments to other experts contribute 0.

    The n*k assignments are sorted by expert, so that each expert's rows are contiguous, and
    multiplied group by group (`_ragged_matmuls`: jax.lax.ragged_dot, the grouped matmul of TPU
    and GPU; on CPU `_blocked_matmuls`), then unsorted. Returns [n, embed] in x's dtype."""
    n, k = experts.shape
    num_local = kernels["fc"].shape[0]
    local = experts.reshape(-1) - first_expert
    is_local = (local >= 0) & (local < num_local)
    key = jnp.where(is_local, local, num_local)  # other devices' experts sort last
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros((num_local + 1,), jnp.int32).at[key].add(1)[:num_local]
    rows = jnp.take(x, order // k, axis=0)  # [n*k, embed], grouped by expert
    out = jax.lax.platform_dependent(
        rows,
        jnp.take(key, order),
        group_sizes,
        kernels,
        cpu=functools.partial(_blocked_matmuls, activation=activation),
        default=functools.partial(_ragged_matmuls, activation=activation),
    )
    # Rows of other devices' experts lie past the groups: their values are unspecified.
    out = jnp.where(jnp.take(is_local, order)[:, None], out, jnp.zeros((), out.dtype))
    out = jnp.take(out, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nke,nk->ne", out, weights.astype(out.dtype))


def _ragged_matmuls(
    rows: jax.Array,
    keys: jax.Array,
    group_sizes: jax.Array,
    kernels: dict[str, jax.Array],
    activation: str,
) -> jax.Array:
    """The experts' MLP on rows [M, embed] sorted into groups of group_sizes [E_local] rows
    (keys: each row's group, unused here), with `jax.lax.ragged_dot`: [M, embed]."""
    del keys

    def matmul(h: jax.Array, name: str) -> jax.Array:
        return jax.lax.ragged_dot(h, kernels[name], group_sizes)

    h = matmul(rows, "fc")
    gate = matmul(rows, "gate") if "gate" in kernels else None
    return matmul(mlp_activation(activation, h, gate), "proj")


def _blocked_matmuls(
    rows: jax.Array,
    keys: jax.Array,
    group_sizes: jax.Array,
    kernels: dict[str, jax.Array],
    activation: str,
) -> jax.Array:
    """`_ragged_matmuls` as MegaBlocks' block-sparse product with static shapes: each group is
    padded to a multiple of a block of b rows, every block belongs to one expert, and the
    blocks are multiplied by their experts' kernels (gathered per block) in one batched matmul.
    XLA:CPU has no grouped matmul (jax computes ragged_dot densely over the groups, E times the
    work); this costs at most (M / b + E) * b rows. Rows with key >= E_local are left out."""
    rows_total, embed = rows.shape
    num_local = group_sizes.shape[0]
    block = int(min(128, max(8, 2 ** math.ceil(math.log2(max(1, rows_total // num_local))))))
    num_blocks = -(-rows_total // block) + num_local  # enough for any group sizes
    padded = -(-group_sizes // block) * block
    padded_start = jnp.cumsum(padded) - padded
    start = jnp.cumsum(group_sizes) - group_sizes
    group = jnp.minimum(keys, num_local - 1)
    slot = padded_start[group] + jnp.arange(rows_total) - start[group]
    slot = jnp.where(keys < num_local, slot, num_blocks * block)  # past the end: dropped
    padded_rows = jnp.zeros((num_blocks * block, embed), rows.dtype).at[slot].set(rows, mode="drop")
    owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, side="right")
    owner = jnp.minimum(owner, num_local - 1)  # blocks past the last group: zeros, any expert
    blocks = padded_rows.reshape(num_blocks, block, embed)

    def matmul(h: jax.Array, name: str) -> jax.Array:
        return jnp.einsum("nbi,nio->nbo", h, jnp.take(kernels[name], owner, axis=0))

    h = matmul(blocks, "fc")
    gate = matmul(blocks, "gate") if "gate" in kernels else None
    out = matmul(mlp_activation(activation, h, gate), "proj").reshape(-1, embed)
    return jnp.take(out, jnp.minimum(slot, num_blocks * block - 1), axis=0)


def gathered_experts(
    x: jax.Array, experts: jax.Array, weights: jax.Array, kernels: dict[str, jax.Array],
    activation: str,
) -> jax.Array:  # fmt: skip
    """Dropless experts for a decoding step: each token's k experts' kernels gathered
    ([n, k, embed, hidden]) and applied to it, for few tokens (n * k <= E: it reads no more
    than the layer's kernels, which a memory-bound decoding step reads anyway). Unlike
    ragged_dot it maps under jax.vmap (serving/slots.py maps the step over its slots).
    x [n, embed], experts int32 [n, k], weights [n, k]; returns [n, embed] in x's dtype."""

    def matmul(h: jax.Array, name: str, spec: str) -> jax.Array:
        return jnp.einsum(spec, h, jnp.take(kernels[name], experts, axis=0))

    h = matmul(x, "fc", "ni,nkio->nko")
    gate = matmul(x, "gate", "ni,nkio->nko") if "gate" in kernels else None
    out = matmul(mlp_activation(activation, h, gate), "proj", "nki,nkio->nko")
    return jnp.einsum("nke,nk->ne", out, weights.astype(out.dtype))


def _mesh_axes(names: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The mesh axes the active logical rules give each of `names` (one tuple per name), each
    on its own: 'batch' and 'expert' both name the expert mesh axis, which one array's spec
    would give to the first only."""
    specs = [nn.logical_to_mesh_axes((name,))[0] for name in names]
    return tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in specs)


def dropless_experts(
    x: jax.Array, routing: Routing, kernels: dict[str, jax.Array], activation: str
) -> jax.Array:
    """Dropless experts on tokens x [N, embed] (routed by `routing`), on one device or, under
    a mesh with logical axis rules (training, tools.aot), with `jax.shard_map`; returns
    [N, embed] in x's dtype.

    Why shard_map: the grouped matmul's groups have sizes known only at run time, which XLA's
    partitioner cannot split; under jit alone it would gather every token and every expert
    on every device. Inside the map each device holds its share of the tokens (split over the
    'batch' and 'length' axes) and the experts of its 'expert' shard (their hidden units split
    over 'mlp', tensor parallelism; their 'embed' axis gathered first, as FSDP does). The
    tokens are all-gathered over the expert axes, each device runs its local experts on the
    assignments that reach them, and a reduce-scatter over the expert axes sums the experts'
    outputs back onto the tokens' devices (the all-gather token dispatcher of Megatron-Core:
    static shapes and no dropped token, where an all-to-all would need buffers sized for the
    worst case, which is every token). Tensor-parallel partial sums are added with a psum."""
    dtype = x.dtype
    kernels = {name: k.astype(dtype) for name, k in kernels.items()}
    mesh = jax.sharding.get_abstract_mesh()
    token_axes, expert_axes, mlp_axes = _mesh_axes(("batch", "expert", "mlp"))
    token_axes += _mesh_axes(("length",))[0]
    sizes = {} if mesh.empty else dict(mesh.shape)
    num_experts, hidden = kernels["fc"].shape[0], kernels["fc"].shape[-1]
    token_axes = tuple(a for a in token_axes if sizes.get(a, 1) > 1)
    expert_axes = tuple(a for a in expert_axes if sizes.get(a, 1) > 1)
    mlp_axes = tuple(a for a in mlp_axes if sizes.get(a, 1) > 1)
    ways = lambda axes: math.prod(sizes[a] for a in axes)  # noqa: E731
    if num_experts % ways(expert_axes):
        expert_axes = ()  # config_validation refuses this for training; replicate here
    if hidden % ways(mlp_axes):
        mlp_axes = ()  # the rules keep such a kernel whole (sharding._fit_spec)
    if x.shape[0] % ways(token_axes):
        token_axes = ()  # e.g. one sequence decoded on a data-parallel mesh
    if not (token_axes or expert_axes or mlp_axes):
        return grouped_experts(x, routing.experts, routing.weights, kernels, activation)

    gather = tuple(a for a in expert_axes if a in token_axes)
    rest = tuple(a for a in expert_axes if a not in token_axes)  # tokens whole on these
    per_device = num_experts // ways(expert_axes)

    def local(x, experts, weights, kernels):
        if gather:
            x, experts, weights = (
                jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, experts, weights)
            )
        first = jax.lax.axis_index(expert_axes) * per_device if expert_axes else 0
        y = grouped_experts(x, experts, weights, kernels, activation, first)
        if mlp_axes:
            y = jax.lax.psum(y, mlp_axes)
        if gather:
            y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
        if rest:
            y = jax.lax.psum(y, rest)
        return y

    def spec(*axes: tuple[str, ...]) -> PartitionSpec:
        return PartitionSpec(*(a or None for a in axes))

    tokens = spec(token_axes)
    up, down = spec(expert_axes, (), mlp_axes), spec(expert_axes, mlp_axes, ())
    kernel_specs = {name: down if name == "proj" else up for name in kernels}
    return jax.shard_map(
        local,
        in_specs=(tokens, tokens, tokens, kernel_specs),
        out_specs=tokens,
    )(x, routing.experts, routing.weights, kernels)


class Router(nn.Module):
    """The router of a sparse layer: a float32 linear map embed -> E ('kernel', [embed, E];
    Switch's selective precision) and, with bias_update_rate > 0, the selection bias ('bias',
    [E], zeros at first: DeepSeek-V3's e_score_correction_bias)."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Routing:
        """Routes tokens x [N, embed]; while training, sows the bias update (PARAM_UPDATES)."""
        c = self.config
        kernel = self.param("kernel", logical_normal(0.02, ("embed", None)),
                            (x.shape[-1], c.num_experts))  # fmt: skip
        # The tokens stay split as the batch is (else XLA gathers them all for the top-k).
        logits = nn.with_logical_constraint(x.astype(jnp.float32) @ kernel, ("batch", None))
        bias = None
        if c.bias_update_rate > 0:
            bias = self.param("bias", logical_zeros((None,)), (c.num_experts,))
        routing = route(logits, bias, c.top_k, c.router, c.norm_topk)
        if bias is not None and train and not self.is_initializing():
            # b_i += rate * sign(mean load - load_i): the under-loaded experts are chosen more.
            load = expert_load(routing.experts, c.num_experts)
            update = c.bias_update_rate * jnp.sign(jnp.mean(load) - load)
            self.sow(PARAM_UPDATES, "bias", update, init_fn=lambda: 0, reduce_fn=_replace)
        return routing


def _replace(_: Any, value: Any) -> Any:
    """A sow reduction that stores the value itself (not a tuple): its path is the parameter's."""
    return value


class MoEFeedForward(nn.Module):
    """A sparse feed-forward layer: Router -> top-k dispatch (dropless or capacity-based) ->
    E expert MLPs -> gate-weighted sum -> dropout, on x [batch, length, embed] (any float
    dtype; the result in config.dtype). Parameters: router/kernel [embed, E] (router/bias [E]),
    fc/kernel and, for SwiGLU, gate/kernel [E, embed, hidden], proj/kernel [E, hidden, embed];
    the experts have no biases (Switch, Mixtral, OLMoE, DeepSeek have none)."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the layer; while training, sows its losses and statistics."""
        c = self.config
        batch, length, embed = x.shape
        routing = Router(c, name="router")(x.reshape(-1, embed), train)
        up, down = (c.num_experts, embed, c.hidden_dim), (c.num_experts, c.hidden_dim, embed)
        names = ("fc", "gate", "proj") if c.activation == "swiglu" else ("fc", "proj")
        kernels = {
            name: _StackedKernel(
                down if name == "proj" else up,
                ("expert", "mlp", "embed") if name == "proj" else ("expert", "embed", "mlp"),
                c.residual_init_std if name == "proj" else 0.02,
                name=name,
            )()
            for name in names
        }
        x = x.astype(c.dtype)
        kept = None
        if c.dispatch == "capacity" and not c.decode:
            y, kept = capacity_experts(x, routing, kernels, c)
        else:  # decoding is always dropless: a token's experts never depend on the others
            flat = x.reshape(-1, embed)
            if c.decode and flat.shape[0] * c.top_k <= c.num_experts:  # a decoding step
                kernels = {name: k.astype(c.dtype) for name, k in kernels.items()}
                r = routing
                y = gathered_experts(flat, r.experts, r.weights, kernels, c.activation)
            else:
                y = dropless_experts(flat, routing, kernels, c.activation)
            y = y.reshape(x.shape)
        y = nn.with_logical_constraint(y, ("batch", "length", "embed"))
        if train and not self.is_initializing():
            self._sow_statistics(routing, kept)
        return nn.Dropout(c.dropout_rate, deterministic=not train)(y)

    def _sow_statistics(self, routing: Routing, kept: jax.Array | None) -> None:
        """The layer's share of the losses (LOSSES) and its statistics (METRICS)."""
        c = self.config
        share = 1.0 / c.num_sparse_layers  # the objective averages the losses over layers
        if c.aux_loss_coef:
            aux = c.aux_loss_coef * load_balancing_loss(routing)
            self.sow(LOSSES, "moe_aux_loss", share * aux)
        if c.z_loss_coef:
            self.sow(LOSSES, "moe_z_loss", share * c.z_loss_coef * router_z_loss(routing.logits))
        self.sow(METRICS, "moe_router_entropy", router_entropy(routing.probs))
        load = expert_load(routing.experts, c.num_experts)
        for i in range(c.num_experts):
            self.sow(METRICS, f"moe_load_e{i:02d}", load[i])
        if kept is not None:
            self.sow(METRICS, "moe_dropped_fraction", 1.0 - jnp.mean(kept.astype(jnp.float32)))


class _StackedKernel(nn.Module):
    """One [E, ...] kernel of the experts (a module of its own so that its parameter is named
    '<name>/kernel', as the dense MLP's are: the optimizers treat it as a kernel)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", logical_normal(self.std, self.axes), self.shape)
