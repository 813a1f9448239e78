"""Compile a config's train and eval steps for a TPU topology, on any machine, and say whether
they fit: memory and FLOPs per chip before launching (MaxText's train_compile.py does the same).

    python -m tools.aot --config=configs/gpt2_small.py --topology=v5p:2x2x1 [--num_slices=2]
        [--config.mesh_shape.fsdp=4 --config.mesh_shape.data=-1 ...] [--find_max_batch]
    python -m tools.aot --config=configs/fashion_mnist_cnn.py --topology=v6e:2x2 \
        [--config.synthetic.image_shape=32,32,3 --config.model.num_classes=100]

With `jax[tpu]` installed (setup.py's dev extra brings the matching libtpu), libtpu describes a
TPU topology without a TPU (`jax.experimental.topologies.get_topology_desc`) and the real
XLA:TPU compiler compiles for it. The run is built exactly as train.py builds it
(`experiment.build_run` on the topology's devices), on synthetic data of the config's shapes
(`config.dataset="synthetic"`, data/synthetic.py: tokens [batch, model.block_size] from
model.vocab_size for a language model; images of `config.synthetic.image_shape` for a
classifier), and its train step (`run.compiled.train_step`: the same shardings, donation,
steps_per_dispatch, gradient accumulation, dtype and remat) and eval step are lowered from
abstract arguments and compiled. Reported per chip: parameter and optimizer-state bytes (from
the state's shardings), XLA's argument, output, alias, temporary and peak bytes and their total
against the chip's HBM (`CHIPS`), FLOPs per step (XLA's cost analysis and the model file's
analytic formula) with the step time they imply at 50% MFU, and the compile times. Prints a
table, then one JSON line; exits with status 1 if a step does not fit.

`--find_max_batch` searches, for each remat policy of the model (the GPT's REMAT_POLICIES: none,
full, dots_saveable, dots_with_no_batch_dims_saveable), the largest global batch (a multiple of
the data-parallel size: data x fsdp x expert) whose train step fits.

No TPU is needed, and none is contacted: on a host without one, libtpu is told not to query a
metadata server (TPU_SKIP_MDS_QUERY) nor look for other hosts, before JAX is imported
(`offline_libtpu_environment`; docs/tpu.md shows the strace check).
"""

from __future__ import annotations

import os

from runtime import cli


def offline_libtpu_environment() -> None:
    """On a host without a TPU: the environment under which libtpu only compiles, set before
    JAX is imported. JAX on the CPU (no search for a TPU at start-up); no metadata-server query;
    this host alone as the TPU "workers"; and no exclusive /tmp/libtpu_lockfile, which another
    process that loaded libtpu may hold (nothing is shared: no chip is used). Never forced on a
    TPU VM, where libtpu must find its chips and hosts."""
    if cli.tpu_attached():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"


offline_libtpu_environment()  # before JAX (and libtpu) are loaded

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import experiment  # noqa: E402
import models  # noqa: E402
import sharding  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a chip holds and computes (Google Cloud's TPU pages: the v4,
    v5e, v5p, v6e and TPU7x system architecture documents)."""

    name: str  # the topology names' prefix, e.g. 'v5e' in 'v5e:2x2'
    device_kinds: tuple[str, ...]  # jax's device_kind of its devices
    hbm_bytes: int  # high-bandwidth memory per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    accelerator_type: str  # TPU_ACCELERATOR_TYPE's form: '{}' is filled with the core count
    cores_per_chip: int  # TensorCores per chip (the accelerator type counts cores)


CHIPS = (
    Chip("v4", ("TPU v4",), 32 * GIB, 275e12, "v4-{}", 2),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GIB, 197e12, "v5litepod-{}", 1),
    Chip("v5p", ("TPU v5", "TPU v5p"), 95 * GIB, 459e12, "v5p-{}", 2),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GIB, 918e12, "v6e-{}", 1),
    # Ironwood: two TensorCores per chip, each its own JAX device; 2,307 TFLOP/s bf16 (4,614 fp8).
    Chip("tpu7x", ("TPU7x",), 192 * GIB, 2307e12, "tpu7x-{}", 2),
)
CHIPS_SOURCE = "Google Cloud's TPU pages (HBM and dense bf16 peak per chip)"
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v4:2x2x1, tpu7x:2x2x1"
MFU = 0.5  # the utilisation the implied step time assumes

_TOPOLOGY_RE = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(?:x\d+)*)$")


def chip_for_kind(device_kind: str) -> Chip | None:
    """The CHIPS entry of a device kind (e.g. 'TPU v5 lite'), or None."""
    for chip in CHIPS:
        if device_kind in chip.device_kinds:
            return chip
    return None


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU topology's compile-only devices and what a chip of it holds."""

    name: str
    num_slices: int
    devices: list[Any]
    chip: Chip
    devices_per_chip: int  # 2 for v4 and TPU7x (two TensorCores, two devices), else 1

    @property
    def num_chips(self) -> int:
        return len(self.devices) // self.devices_per_chip

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        return self.chip.peak_flops / self.devices_per_chip


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """The compile-only TPU devices of topology `name` (e.g. 'v5e:2x2') x `num_slices`.

    Raises cli.UserError for a malformed or unknown name, a missing libtpu, or a chip without
    HBM and peak figures in CHIPS."""
    if importlib.util.find_spec("libtpu") is None:
        raise cli.UserError(
            "libtpu is not installed, so no TPU program can be compiled here: `make setup` "
            f"installs it (jax[tpu], setup.py's dev extra), or pip install "
            f"'jax[tpu]=={jax.__version__}'."
        )
    match = _TOPOLOGY_RE.match(name)
    if match is None:
        raise cli.UserError(
            f"--topology={name!r} is not a topology name: use generation:chips per dimension, "
            f"e.g. {TOPOLOGY_EXAMPLES}."
        )
    if num_slices < 1:
        raise cli.UserError(f"--num_slices={num_slices} must be at least 1.")
    known = {c.name: c for c in CHIPS}
    chip = known.get(match["gen"])
    if chip is None:
        raise cli.UserError(
            f"--topology={name!r}: unknown TPU generation {match['gen']!r}; tools/aot.py knows "
            f"{list(known)} (CHIPS holds their HBM and peak), e.g. {TOPOLOGY_EXAMPLES}."
        )
    if not cli.tpu_attached():
        # Only silences libtpu's start-up warning; the topology comes from `name`.
        chips = math.prod(int(d) for d in match["dims"].split("x"))
        os.environ.setdefault(
            "TPU_ACCELERATOR_TYPE", chip.accelerator_type.format(chips * chip.cores_per_chip)
        )
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu's JaxRuntimeError: INVALID_ARGUMENT ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise cli.UserError(
            f"--topology={name!r}: libtpu cannot make this topology ({reason}); e.g. "
            f"{TOPOLOGY_EXAMPLES}."
        ) from e
    devices = list(desc.devices)
    if chip_for_kind(devices[0].device_kind) is not chip:
        raise cli.UserError(
            f"--topology={name!r} has devices of kind {devices[0].device_kind!r}, not those of "
            f"{chip.name} {chip.device_kinds}: add the kind to CHIPS in tools/aot.py."
        )
    per_chip = {}
    for d in devices:
        key = (getattr(d, "slice_index", 0), tuple(getattr(d, "coords", (d.id,))))
        per_chip[key] = per_chip.get(key, 0) + 1
    return Topology(name, num_slices, devices, chip, max(per_chip.values()))


def build(config: ml_collections.ConfigDict, topology: Topology) -> experiment.Run:
    """experiment.build_run on the topology's devices and synthetic data of the config's shapes
    (whatever `config.dataset` names: nothing is read); cli.UserError if the config cannot run."""
    if config.parallelism != "jit":
        raise cli.UserError(
            f"config.parallelism={config.parallelism!r}: ahead-of-time compilation describes "
            "'jit' parallelism (a sharded mesh); drop --config.parallelism."
        )
    try:
        config = _with(config, dataset="synthetic")
        return experiment.build_run(config, devices=topology.devices)
    except sharding.MeshError as e:
        devices = f"--topology={topology.name}: {len(topology.devices)} devices"
        raise cli.UserError(f"{e} ({devices})") from e


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


class OutOfHbmError(Exception):
    """XLA refused to compile: the program needs more HBM than the chip has."""


_OOM_NUMBERS = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _gib(number: str, unit: str) -> float:
    return float(number) * {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}[unit]


def compile_step(run: experiment.Run, batch_size: int, train: bool = True) -> tuple[Any, float]:
    """(compiled step, seconds to lower and compile) of the train step (or the eval step) on
    an abstract global batch of `batch_size`; OutOfHbmError when XLA finds it cannot fit."""
    steps = run.compiled
    with steps.context():
        start = time.perf_counter()
        batch = steps.abstract_batch(
            run.input_spec.example_input, batch_size, run.config.task, train=train
        )
        step = steps.train_step if train else steps.eval_step
        try:
            compiled = step.lower(run.abstract_state, batch).compile()
        except Exception as e:  # JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory ...
            if "RESOURCE_EXHAUSTED" in str(e):
                raise OutOfHbmError(str(e).strip().splitlines()[0]) from e
            raise
    return compiled, time.perf_counter() - start


def memory_report(compiled: Any, topology: Topology) -> dict[str, Any]:
    """XLA's memory analysis of one device's program, its total and whether it fits.

    The total is the larger of XLA's two accounts, plus the program's code: its peak (the
    buffers live at the worst moment, donated ones once) and arguments + outputs - aliased
    (donated) + temporaries (MaxText's sum). Neither bounds the other on XLA:TPU (a small
    program's temporaries can live outside HBM, in the core's own memory; buffer assignment
    can reserve more than the simulated peak), so the verdict takes the larger."""
    m = compiled.memory_analysis()
    report = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "code_bytes": int(m.generated_code_size_in_bytes),
    }
    report["peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    summed = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
              + report["temp_bytes"])  # fmt: skip
    report["total_bytes"] = max(report["peak_bytes"], summed) + report["code_bytes"]
    report["fits"] = report["total_bytes"] <= topology.hbm_per_device
    return report


def _xla_flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def analytic_flops_per_step(run: experiment.Run) -> float | None:
    """The model file's `training_flops_per_token` x tokens of a global batch (None if the
    model file defines no formula)."""
    formula = getattr(models.model_module(run.config.model.name), "training_flops_per_token", None)
    if formula is None or run.config.task != "lm":
        return None
    seq = int(run.input_spec.example_input.shape[1])
    return formula(run.model, seq) * seq * int(run.config.batch_size)


def _loops(run: experiment.Run) -> list[str]:
    """The loops of the compiled train step, whose bodies XLA's cost analysis counts once."""
    config, model, steps_per_dispatch = run.config, run.model, run.compiled.steps_per_dispatch
    loops = []
    if steps_per_dispatch > 1:
        loops.append(f"steps_per_dispatch={steps_per_dispatch}")
    if int(config.grad_accum_steps) > 1:
        loops.append(f"grad_accum_steps={config.grad_accum_steps}")
    if getattr(model, "scan_layers", False):
        loops.append("scan_layers")
    return loops


def analyze(config: ml_collections.ConfigDict, topology: Topology,
            evaluate: bool = True) -> dict[str, Any]:  # fmt: skip
    """Builds and compiles the run's steps for `topology`; every figure as a flat dict."""
    run = build(config, topology)
    config = run.config
    batch_ways = math.prod(run.mesh.shape[a] for a in sharding.batch_mesh_axes(config))
    n = len(topology.devices)
    params_bytes = bytes_per_device(run.abstract_state.params)
    opt_bytes = bytes_per_device(run.abstract_state.opt_state)
    state_bytes = bytes_per_device(run.abstract_state)
    result: dict[str, Any] = {
        "config_model": config.model.name,
        "topology": topology.name,
        "num_slices": topology.num_slices,
        "device_kind": topology.devices[0].device_kind,
        "num_devices": n,
        "num_chips": topology.num_chips,
        "devices_per_chip": topology.devices_per_chip,
        "mesh": " ".join(f"{axis}={size}" for axis, size in run.mesh.shape.items()),
        "global_batch": int(config.batch_size),
        "batch_per_data_parallel_device": int(config.batch_size) // batch_ways,
        "grad_accum_steps": int(config.grad_accum_steps),
        "steps_per_dispatch": run.compiled.steps_per_dispatch,
        "dtype": config.dtype,
        "remat_policy": getattr(run.model, "remat_policy", "n/a"),
        "scan_layers": getattr(run.model, "scan_layers", "n/a"),
        "num_params": run.num_params,
        "params_bytes_per_device": params_bytes,
        "opt_state_bytes_per_device": opt_bytes,
        "state_bytes_per_device": state_bytes,
        "hbm_bytes_per_device": topology.hbm_per_device,
        "hbm_source": f"{topology.chip.name}: {topology.chip.hbm_bytes / GIB:g} GiB per chip, "
        f"{CHIPS_SOURCE}",
    }
    fits = True
    try:
        compiled, seconds = compile_step(run, int(config.batch_size), train=True)
    except OutOfHbmError as e:
        result.update(train_compile_s=None, train_out_of_memory=str(e), train_fits=False)
        numbers = _OOM_NUMBERS.search(str(e))
        if numbers:
            result["train_needed_gib_per_device"] = _gib(numbers[1], numbers[2])
            result["usable_hbm_gib_per_device"] = _gib(numbers[3], numbers[4])
        compiled, fits = None, False
    if compiled is not None:
        memory = memory_report(compiled, topology)
        fits = memory["fits"]
        result.update({f"train_{k}": v for k, v in memory.items()}, train_compile_s=seconds)
        xla = _xla_flops(compiled)
        result["xla_flops_per_device"] = xla
        loops = _loops(run)
        result["xla_flops_note"] = (
            "per compiled call; each loop body counted once (" + ", ".join(loops) + ")"
            if loops
            else "per step"
        )
    analytic = analytic_flops_per_step(run)
    per_device = None if analytic is None else analytic / n
    result["analytic_flops_per_step_per_device"] = per_device
    if per_device is None and compiled is not None and not _loops(run):
        per_device = result["xla_flops_per_device"]  # no formula: XLA's count (no loops)
    peak = topology.peak_flops_per_device
    result["peak_flops_per_device"] = peak
    result["step_time_at_50pct_mfu_s"] = None if per_device is None else per_device / (MFU * peak)
    if config.task == "lm" and per_device is not None:
        tokens = int(config.batch_size) * int(run.input_spec.example_input.shape[1])
        result["tokens_per_s_at_50pct_mfu"] = tokens / result["step_time_at_50pct_mfu_s"]
    if evaluate:
        try:
            compiled, seconds = compile_step(run, int(config.eval_batch_size), train=False)
            memory = memory_report(compiled, topology)
            result.update({f"eval_{k}": v for k, v in memory.items()}, eval_compile_s=seconds)
            fits = fits and memory["fits"]
        except OutOfHbmError as e:
            result.update(eval_out_of_memory=str(e), eval_fits=False)
            numbers = _OOM_NUMBERS.search(str(e))
            if numbers:
                result["eval_needed_gib_per_device"] = _gib(numbers[1], numbers[2])
                result["usable_hbm_gib_per_device"] = _gib(numbers[3], numbers[4])
            fits = False
    result["fits"] = fits
    return result


def verdict(result: dict[str, Any], topology: Topology) -> str:
    """One line: which steps do not fit, with their bytes per device against the HBM."""
    needs = []
    for step in ("train", "eval"):
        if f"{step}_out_of_memory" in result:
            needed = result.get(f"{step}_needed_gib_per_device")
            usable = result.get("usable_hbm_gib_per_device")
            needs.append(
                f"the {step} step needs {needed:.2f} GiB (XLA's count; {usable:g} GiB usable)"
                if needed is not None and usable is not None
                else f"the {step} step: {result[f'{step}_out_of_memory']}"
            )
        elif result.get(f"{step}_fits") is False:
            needs.append(f"the {step} step needs {result[f'{step}_total_bytes'] / GIB:.2f} GiB")
    hbm = topology.hbm_per_device / GIB
    return (
        f"{' and '.join(needs)} per device; a {topology.chip.name} chip has {hbm:g} GiB HBM "
        f"({topology.name}). Lower the batch, shard the state (mesh_shape.fsdp), or "
        "rematerialise (model.remat_policy)."
    )


def _with(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of `config` with top-level fields or `model.<field>` (as 'model__field') set."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in fields.items():
        if key.startswith("model__"):
            config.model[key[len("model__") :]] = value
        else:
            config[key] = value
    return config


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int,
                    tolerance: float = 0.0) -> int:  # fmt: skip
    """The largest m in [1, limit] with fits(m), for a `fits` that holds up to some m and
    fails above it (0 if fits(1) fails): doubling from `start`, then bisection, until the
    failing m is within `tolerance` (relative) of the fitting one (0: exactly)."""
    good, bad = 0, limit + 1
    m = min(max(1, start), limit)
    while m <= limit:
        if fits(m):
            good, m = m, m * 2
        else:
            bad = m
            break
    while bad - good > max(1, tolerance * good):
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def find_max_batch(config: ml_collections.ConfigDict, topology: Topology,
                   policy: str | None = None, limit: int = 1 << 20,
                   tolerance: float = 0.0,
                   known: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The largest global batch whose train step fits (with `model.remat_policy=policy` if
    given): doubling, then bisection, over multiples of the data-parallel size (times
    grad_accum_steps), each probe a compilation. `limit`: the largest batch tried;
    `tolerance`: stop when the smallest failing batch is within this fraction of the largest
    fitting one (0: the exact multiple). `known`: `analyze`'s result for this config and
    policy, whose train step at the config's batch is then not compiled again."""
    if policy is not None:
        config = _with(config, model__remat_policy=policy)
    run = build(config, topology)
    batch_ways = math.prod(run.mesh.shape[a] for a in sharding.batch_mesh_axes(config))
    unit = batch_ways * int(config.grad_accum_steps)
    probes: list[dict[str, Any]] = []

    def fits(multiple: int) -> bool:
        batch = multiple * unit
        if known is not None and batch == known["global_batch"]:
            fit = bool(known["train_fits"])
            probes.append({"batch": batch, "fits": fit, "compile_s": known.get("train_compile_s"),
                           "total_bytes": known.get("train_total_bytes")})  # fmt: skip
            return fit
        run = build(_with(config, batch_size=batch), topology)
        try:
            compiled, seconds = compile_step(run, batch, train=True)
        except OutOfHbmError:
            probes.append({"batch": batch, "fits": False, "compile_s": None})
            return False
        memory = memory_report(compiled, topology)
        probes.append({"batch": batch, "fits": memory["fits"], "compile_s": seconds,
                       "total_bytes": memory["total_bytes"]})  # fmt: skip
        return memory["fits"]

    start = time.perf_counter()
    start_multiple = max(1, int(config.batch_size) // unit)
    good = largest_fitting(fits, start_multiple, limit // unit, tolerance)
    best = next((p for p in probes if p["batch"] == good * unit and p["fits"]), None)
    return {
        "remat_policy": getattr(run.model, "remat_policy", "n/a"),
        "max_global_batch": good * unit,
        "batch_multiple": unit,
        "smallest_failing_batch": min((p["batch"] for p in probes if not p["fits"]), default=None),
        "total_bytes_at_max": None if best is None else best["total_bytes"],
        "compiles": len(probes),
        "search_s": time.perf_counter() - start,
        "probes": probes,
    }


def remat_policies(config: ml_collections.ConfigDict) -> list[str | None]:
    """The model's remat policies (its module's REMAT_POLICIES), or [None] if it has none."""
    module = models.model_module(config.model.name)
    if "remat_policy" not in models.constructor_fields(config.model.name):
        return [None]
    return list(getattr(module, "REMAT_POLICIES", {"none": None}))


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and (key.endswith("_bytes") or key.endswith("bytes_per_device")):
        return f"{value / GIB:,.3f} GiB"
    if isinstance(value, float):
        if key.endswith("_s"):
            return f"{value:,.3g} s" if value < 1e3 else f"{value:,.0f} s"
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e6 or value == 0 else f"{value:.3e}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """Two aligned columns: figure and value (bytes in GiB)."""
    rows = {k: v for k, v in result.items() if k != "max_batch"}
    width = max(len(k) for k in rows)
    lines = [f"{k.ljust(width)}  {_fmt(v, k)}" for k, v in rows.items()]
    for entry in result.get("max_batch", []):
        total = entry["total_bytes_at_max"]
        lines.append(
            f"max batch (remat {entry['remat_policy']}): {entry['max_global_batch']} "
            f"(multiples of {entry['batch_multiple']}; smallest failing probe "
            f"{entry['smallest_failing_batch']}; "
            f"{'-' if total is None else f'{total / GIB:.2f} GiB'} per device; "
            f"{entry['compiles']} compiles in {entry['search_s']:.0f} s)"
        )
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: importing aot defines none)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU topology, e.g. {TOPOLOGY_EXAMPLES}.")
    flags.DEFINE_integer("num_slices", 1, "Slices of the topology (joined by DCN).")
    flags.DEFINE_bool("eval", True, "Also compile the eval step (at config.eval_batch_size).")
    flags.DEFINE_bool(
        "find_max_batch", False, "Also search the largest global batch that fits, per remat policy."
    )
    flags.DEFINE_list(
        "remat_policies", [], "--find_max_batch: these remat policies (default: the model's all)."
    )
    flags.DEFINE_float(
        "search_tolerance", 0.0,
        "--find_max_batch: stop when the smallest failing batch is within this fraction of the "
        "largest fitting one (0: the exact multiple; 0.25 saves compilations).",
        lower_bound=0.0,
    )  # fmt: skip
    flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> int:
    """absl entry point: the table, then the JSON line; 1 if a step does not fit."""
    del argv
    config = FLAGS.config
    topology = get_topology(FLAGS.topology, FLAGS.num_slices)
    result = analyze(config, topology, evaluate=FLAGS.eval)
    if FLAGS.find_max_batch:
        policies = FLAGS.remat_policies or remat_policies(config)
        # The analysis above compiled the config's batch: the search reuses it for its policy.
        known = {result["remat_policy"]: result, None: result}
        tolerance = FLAGS.search_tolerance
        result["max_batch"] = [
            find_max_batch(config, topology, p, tolerance=tolerance, known=known.get(p))
            for p in policies
        ]
    print(format_table(result), flush=True)
    print(json.dumps(result), flush=True)
    if not result["fits"]:
        print(f"DOES NOT FIT: {verdict(result, topology)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
