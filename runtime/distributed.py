"""Starts JAX's multi-controller runtime when several processes (hosts) run one job."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from runtime import cli


def _on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached. A TPU VM made by `gcloud compute tpus
    tpu-vm create` has no TPU_WORKER_HOSTNAMES variable: jax.distributed finds the slice's hosts
    from the metadata server (a single-host slice becomes a job of one process)."""
    return cli.tpu_attached() and importlib.util.find_spec("libtpu") is not None


def _cluster_detected() -> bool:
    """True on a TPU VM or multi-host GKE TPU slice, a SLURM job of several tasks, or a JobSet."""
    if os.environ.get("SLURM_JOB_ID"):
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or _on_cloud_tpu_vm():
        return True
    return bool(os.environ.get("JOBSET_NAME") or os.environ.get("OMPI_COMM_WORLD_SIZE"))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_devices_per_process: int | None = None,
) -> None:
    """Initialises jax.distributed from explicit values, or by auto-detection on TPU pods, SLURM
    and Kubernetes (JobSet); does nothing for an ordinary single-process run."""
    if cpu_devices_per_process:
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
    if coordinator_address:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


_GPU_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin")


def describe_devices() -> str:
    """One line naming what JAX runs on, e.g. 'JAX 0.12.0.1 on gpu: 8 devices (NVIDIA H100 80GB
    HBM3), 1 process', with a warning appended when a GPU plugin is installed but JAX fell back to
    the CPU (a driver JAX cannot load, or JAX_PLATFORMS=cpu), which would otherwise be silent."""
    devices = jax.devices()
    platform = devices[0].platform
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    processes = jax.process_count()
    line = (
        f"JAX {jax.__version__} on {platform}: {len(devices)} device"
        f"{'s' if len(devices) != 1 else ''} ({kinds}), {processes} process"
        f"{'es' if processes != 1 else ''}"
    )
    plugins = [p for p in _GPU_PLUGINS if importlib.util.find_spec(p) is not None]
    if platform == "cpu" and plugins:
        line += (
            f". WARNING: {plugins[0]} is installed but JAX runs on the CPU: check that the GPU is "
            "visible (nvidia-smi) and JAX_PLATFORMS is unset, and read JAX's start-up warnings."
        )
    return line


def to_host(tree: Any) -> Any:
    """Fetches a (possibly sharded, multi-process) pytree to host numpy arrays, whole on every
    process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def all_processes_agree(ok: bool) -> bool:
    """True only if `ok` on every process (e.g. a damaged shard may be read by one process only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
