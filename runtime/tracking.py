"""Optional Weights & Biases tracking of a run: what TensorBoard gets, also in W&B.

`config.wandb.mode` is 'disabled' (the default: nothing here imports `wandb`), 'offline' (the
run is written under `config.wandb.dir`, by default the workdir, for a later `wandb sync`) or
'online'. metrics_writer.MetricsWriter hands every scalar it writes to the tracker, so W&B's
history holds exactly the TensorBoard scalars (same names, same steps); the run's config is the
W&B run config and the final metrics its summary (goodput included). The attempt's provenance
record (runtime/provenance.py: commit, libraries, devices, hosts) is the run config's
`provenance` entry and the summary's, replaced by each resume. Only process 0 logs.

The W&B run id is kept in <workdir>/wandb_run_id, so a resumed run continues the same W&B run
and a restart (config.restart=True, which moves the workdir's records aside) starts a new one.
"""

from __future__ import annotations

import netrc
import os
import secrets
from typing import Any
from urllib.parse import urlparse

import jax
import ml_collections
import numpy as np

from runtime import cli

RUN_ID_FILE = "wandb_run_id"


class TrackingError(cli.UserError):
    """W&B cannot start as the config asks (no credentials for online mode)."""


class WandbTracker:
    """One W&B run: scalars per step, the config, a summary. Built by `start`."""

    def __init__(self, run: Any):
        self.run = run

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Logs {name: value} at `step` (W&B's step; steps must not decrease)."""
        self.run.log(dict(values), step=int(step))

    def write_summary(self, metrics: dict[str, Any]) -> None:
        """Puts the numbers and strings of `metrics` (final metrics) in the run's summary."""
        self.run.summary.update(_summary_values(metrics))

    def close(self) -> None:
        """Finishes the run (writes its files; online, uploads what is left)."""
        self.run.finish()


def start(
    config: ml_collections.ConfigDict,
    workdir: str,
    resume_step: int,
    provenance: dict[str, Any] | None = None,
) -> WandbTracker | None:
    """Starts (or, when `resume_step` > 0 and the workdir names one, resumes) the W&B run
    `config.wandb` asks for; None when mode is 'disabled' or on processes other than 0.
    `provenance`: this attempt's record (provenance.start_attempt's), put in the run's config
    and summary under 'provenance'.

    Never prompts: online mode without credentials (WANDB_API_KEY, a `wandb login` entry in
    ~/.netrc, or WANDB_IDENTITY_TOKEN_FILE) raises TrackingError naming the fixes."""
    settings = config.wandb
    if settings.mode == "disabled" or jax.process_index() != 0:
        return None
    if settings.mode == "online" and not _has_credentials():
        raise TrackingError(
            "config.wandb.mode='online' needs W&B credentials: run `wandb login` or set "
            "WANDB_API_KEY (or use --config.wandb.mode=offline and `wandb sync` later)."
        )
    import wandb  # only here: a disabled run never imports wandb

    id_path = os.path.join(workdir, RUN_ID_FILE)
    if resume_step > 0 and os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(8)  # W&B run ids: up to 64 of [a-zA-Z0-9_-]
        os.makedirs(workdir, exist_ok=True)
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    directory = settings.dir or workdir
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(
        project=settings.project,
        entity=settings.entity,
        name=settings.name or os.path.basename(os.path.normpath(workdir)),
        dir=directory,
        mode=settings.mode,
        id=run_id,
        resume="allow",
        config=config.to_dict(),
        # No console capture (the progress lines stay ours) and no system-metrics sampler.
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    if provenance is not None:  # a resume records its own attempt: the value may change
        run.config.update({"provenance": provenance}, allow_val_change=True)
        run.summary["provenance"] = provenance
    return WandbTracker(run)


def _has_credentials() -> bool:
    """Whether W&B has a key without asking: the environment, or ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC")
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _summary_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries (numbers, strings, booleans) of `metrics`, and its dicts (final
    metrics' goodput) as their scalar entries; arrays and lists are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, dict):
            value = _summary_values(value)
        if isinstance(value, bool | int | float | str | dict):
            out[key] = value
    return out
