"""Device mesh and logical-axis sharding: the one module that decides how arrays are laid out.

Models name their parameter and activation axes logically (batch, embed, mlp, heads, ...); the
rules below map those names onto the mesh axes `data`, `fsdp` and `tensor` (and `context` and
`expert`, see MESH_AXES):
- batch over data x fsdp (data parallelism; FSDP is data parallelism with sharded state),
- parameters and optimizer state over fsdp along `embed` (ZeRO-3 style),
- attention heads, MLP hidden units and the vocabulary over tensor (Megatron style);
- grouped key/value heads (`kv_heads`, GPT's num_kv_heads < num_heads) over tensor too, which
  `_fit_spec` keeps only where the tensor axis divides their number (else they are replicated,
  as Megatron replicates kv heads when tensor parallelism exceeds them);
- the experts of a Mixture-of-Experts layer (`expert`, models/moe.py) over expert, and the
  batch over expert as well, so that the expert axis is data-parallel outside the MoE layers
  and tokens travel to their experts' devices inside them (expert parallelism, as GShard,
  DeepSpeed-MoE and MaxText do); `batch_no_expert` names the batch of tokens that sit on their
  experts' devices;
- the sequence axis of activations (`length`) over context (context parallelism: each device
  holds L / context positions of every sequence, models/context_parallel.py).
A config can override single rules with `config.logical_axis_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Outermost to innermost (the innermost axes get the closest devices: tensor and expert
# parallelism communicate every layer). `context` splits sequences, `expert` the experts of a
# Mixture-of-Experts layer; both are 1 unless a config asks for them.
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # The batch splits over expert too: outside the MoE layers the expert axis is data-parallel.
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv_heads", "tensor"),  # grouped key/value heads: split only where tensor divides them
    ("kv", None),
    # The sequence axis of activations: split over context (context parallelism; attention
    # crosses the split as models/context_parallel.py says). Parameters never use it.
    ("length", "context"),
    ("layers", None),  # the stacked layers of a scanned model (GPT scan_layers): never split
    ("classes", None),
    ("conv_h", None),
    ("conv_w", None),
    ("expert", "expert"),  # the experts of an MoE layer (models/moe.py), and tokens sent to them
    ("batch_no_expert", ("data", "fsdp")),  # tokens' groups while on their experts' devices
)


class MeshError(ValueError):
    """The requested mesh or batch does not fit the devices."""


def resolve_mesh_shape(mesh_shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Returns the sizes of MESH_AXES, in order (an axis not given is 1), filling a single -1
    with the remaining devices."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"config.mesh_shape has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise MeshError(f"config.mesh_shape={dict(mesh_shape)}: at most one axis may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"config.mesh_shape={dict(mesh_shape)}: sizes must be positive or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"config.mesh_shape={dict(mesh_shape)}: the fixed axes use {known} devices, "
                f"which does not divide the {num_devices} devices present."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"config.mesh_shape={dict(mesh_shape)} needs {math.prod(sizes)} devices but "
            f"{num_devices} are present; make the product {num_devices} or set one axis to -1."
        )
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the mesh of MESH_AXES over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(dict(config.mesh_shape), len(devices))
    # Auto axis types: shardings are propagated by XLA (the classic pjit behaviour).
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:  # jax.make_mesh refuses several TPU slices
        return Mesh(_multi_slice_devices(shape, devices, num_slices), MESH_AXES, axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def _multi_slice_devices(shape: tuple[int, ...], devices: list[Any], num_slices: int) -> Any:
    """The device array of a mesh over several TPU slices (fast ICI links inside a slice, slow
    DCN between them): the slices split the data axis (else fsdp), so that only the gradients'
    reduction crosses DCN, as MaxText's dcn_data_parallelism does."""
    from jax.experimental import mesh_utils

    for i in range(2):  # data, then fsdp
        if shape[i] % num_slices == 0:
            dcn = tuple(num_slices if j == i else 1 for j in range(len(shape)))
            ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, allow_split_physical_axes=True
            )
    raise MeshError(
        f"The devices form {num_slices} slices; config.mesh_shape.data (or fsdp) must be a "
        f"multiple of {num_slices} (mesh {dict(zip(MESH_AXES, shape, strict=True))})."
    )


def logical_axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """Default rules with the config's overrides (`config.logical_axis_rules`) applied by name."""
    overrides = {}
    for rule in config.get("logical_axis_rules", ()) or ():
        name, axes = rule
        overrides[name] = tuple(axes) if isinstance(axes, list) else axes
    rules = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
    return tuple(rules) + tuple(overrides.items())


def batch_mesh_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The mesh axes the logical 'batch' axis splits over under the config's rules (by default
    data, fsdp and expert): their product is the data-parallel size a batch must divide."""
    spec = nn.logical_to_mesh_axes(("batch",), logical_axis_rules(config))[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def batch_sharding(
    mesh: Mesh, rules: Sequence[tuple[str, Any]], stacked: bool = False
) -> NamedSharding:
    """Sharding for arrays whose leading axis is the batch (with `stacked`, the second: a
    [steps, batch, ...] stack of batches for steps.scan_steps)."""
    names = (None, "batch") if stacked else ("batch",)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            fitted.append(None)
            continue
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for axis in axes_tuple:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Shardings for a (possibly `nn.LogicallyPartitioned`-boxed) abstract pytree.

    The result has the structure of the unboxed tree. Leaves without logical names are replicated.
    """
    logical_specs = nn.get_partition_spec(abstract_boxed)
    abstract = nn.unbox(abstract_boxed)

    def to_sharding(logical: PartitionSpec, leaf: Any) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules) if logical else PartitionSpec()
        return NamedSharding(mesh, _fit_spec(mesh_spec, tuple(np.shape(leaf)), mesh))

    return jax.tree.map(
        to_sharding,
        logical_specs,
        abstract,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
