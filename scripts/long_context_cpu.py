"""Step time and memory against sequence length, here and on a TPU slice: docs/performance.md.

    python scripts/long_context_cpu.py                          # every cell, then the tables
    python scripts/long_context_cpu.py --lengths=1024,4096 --settings=one,cp8_ring --notpu

The model is configs/shakespeare_char_cpu.py's GPT (4 layers of width 128, 4 heads) with
`model.block_size` set to each length, one sequence per step (`batch_size=1`), on random tokens
(`config.dataset=synthetic`), in one of the settings:

- `one`: one CPU device, the explicit attention (`plain_attention`, a layer's [heads x L x L]
  float32 scores);
- `cp8_all_gather`, `cp8_ring`: the sequence split over 8 simulated CPU devices (context=8,
  models/context_parallel.py). The 8 devices share this machine's cores, so their step time is
  the cost of the split program, not a speed-up; their memory is per device.

Each CPU cell is one `python -m tools.bench` in its own process (step time: the median of
--steps single steps; tokens/s; peak memory per device from XLA's compiled memory analysis).
A length is skipped, not run, when the last one measured in its setting, scaled by the square
of the lengths' ratio (the scores grow as L^2), needs more than --memory_fraction of this
machine's available memory.
Unless --notpu, the TPU compiler's per-chip memory of the same train step on `v5p:2x2x1`
(`python -m tools.aot`, batch 4: one sequence per chip): `fsdp4` (whole sequences) against
`cp4_ring` (each sequence over the 4 chips). Cells are appended to --out (JSON lines) as they
finish and are not run again. Prints a line per cell, then the Markdown tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# One step per call (the config's steps_per_dispatch would stack 10 batches in memory).
MODEL = [
    "--config=configs/shakespeare_char_cpu.py",
    "--config.dataset=synthetic",
    "--config.steps_per_dispatch=1",
]
CPU_SETTINGS = {
    "one": [],
    "cp8_all_gather": ["--config.mesh_shape.data=1", "--config.mesh_shape.context=8",
                       "--config.model.context_parallel=all_gather"],
    "cp8_ring": ["--config.mesh_shape.data=1", "--config.mesh_shape.context=8",
                 "--config.model.context_parallel=ring"],
}  # fmt: skip
TPU_SETTINGS = {
    "fsdp4": ["--config.mesh_shape.data=1", "--config.mesh_shape.fsdp=4"],
    "cp4_ring": ["--config.mesh_shape.data=1", "--config.mesh_shape.context=4",
                 "--config.model.context_parallel=ring"],
}  # fmt: skip

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Tokens.")
    flags.DEFINE_list("settings", list(CPU_SETTINGS), f"CPU settings, of {list(CPU_SETTINGS)}.")
    flags.DEFINE_bool("tpu", True, "Also compile for v5p:2x2x1 (tools.aot).")
    flags.DEFINE_integer("steps", 3, "tools.bench --steps (timed single steps).")
    flags.DEFINE_float("memory_fraction", 0.6, "Of MemAvailable a CPU cell may expect to use.")
    flags.DEFINE_string("out", "runs/long_context_cpu.jsonl", "JSON lines, one per cell.")
    flags.DEFINE_integer("timeout_s", 3600, "Longest one cell may take.")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _run(command: list[str], env: dict[str, str]) -> dict:
    """The last JSON line a command prints, or {'error': its last stderr line}."""
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=FLAGS.timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][-300:]}


def cpu_cell(setting: str, length: int) -> dict:
    """tools.bench of one setting and length."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if setting != "one":
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    command = [sys.executable, "-m", "tools.bench", *MODEL, *CPU_SETTINGS[setting],
               f"--config.model.block_size={length}", "--config.batch_size=1",
               "--config.eval_batch_size=1", f"--steps={FLAGS.steps}", "--warmup=1",
               "--rounds=1"]  # fmt: skip
    return _run(command, env)


def tpu_cell(setting: str, length: int) -> dict:
    """tools.aot of one setting and length on v5p:2x2x1."""
    command = [sys.executable, "-m", "tools.aot", *MODEL, *TPU_SETTINGS[setting],
               "--topology=v5p:2x2x1", f"--config.model.block_size={length}",
               "--config.batch_size=4", "--config.eval_batch_size=4", "--noeval"]  # fmt: skip
    return _run(command, {**os.environ, "JAX_PLATFORMS": "cpu"})


class Cells:
    """The cells of --out, run on first use."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    self.done[(r["cell_kind"], r["cell_setting"], r["cell_length"])] = r

    def get(self, kind: str, setting: str, length: int) -> dict:
        key = (kind, setting, length)
        if key not in self.done:
            started = time.time()
            result = (cpu_cell if kind == "cpu" else tpu_cell)(setting, length)
            result.update(cell_kind=kind, cell_setting=setting, cell_length=length,
                          cell_wall_s=round(time.time() - started, 1))  # fmt: skip
            self.done[key] = result
            with open(self.path, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{kind} {setting:15} L={length:6}: {cell_text(result)} "
                  f"(wall {result['cell_wall_s']} s)", flush=True)  # fmt: skip
        return self.done[key]


def cell_text(r: dict) -> str:
    """A cell for the tables."""
    if r.get("skipped"):
        return "skipped (memory)"
    if r.get("error"):
        return "failed"
    if r["cell_kind"] == "cpu":
        memory = r["peak_device_memory_bytes"] / GIB
        return (
            f"{r['step_time_median_s']:.3g} s, {r['tokens_per_sec']:,.0f} tok/s, {memory:.2f} GiB"
        )
    if r.get("train_total_bytes") is None:
        return "failed"
    text = f"{r['train_total_bytes'] / GIB:.2f} GiB"
    return text if r["train_fits"] else f"no ({text})"


def main(argv: list[str]) -> None:
    """absl entry point: the cells not yet in --out, then the tables."""
    del argv
    lengths = [int(x) for x in FLAGS.lengths]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    cells = Cells(FLAGS.out)
    for setting in FLAGS.settings:
        needed, last = 0, 0
        for length in lengths:
            key = ("cpu", setting, length)
            expected = needed * (length / last) ** 2 if last else 0
            if key not in cells.done and expected > FLAGS.memory_fraction * _available_bytes():
                cells.done[key] = {"skipped": True, "cell_kind": "cpu"}
                print(f"cpu {setting:15} L={length:6}: skipped (memory)", flush=True)
                continue
            r = cells.get("cpu", setting, length)
            devices = 8 if setting != "one" else 1
            needed, last = r.get("peak_device_memory_bytes", 0) * devices, length
    if FLAGS.tpu:
        for setting in TPU_SETTINGS:
            for length in lengths:
                cells.get("tpu", setting, length)
    print("\n| length | " + " | ".join(FLAGS.settings) + " |")
    print("|---|" + "---|" * len(FLAGS.settings))
    for length in lengths:
        row = [cell_text(cells.done[("cpu", s, length)]) for s in FLAGS.settings]
        print(f"| {length:,} | " + " | ".join(row) + " |")
    if FLAGS.tpu:
        print("\nv5p:2x2x1, batch 4, per chip:")
        print("| length | " + " | ".join(TPU_SETTINGS) + " |")
        print("|---|" + "---|" * len(TPU_SETTINGS))
        for length in lengths:
            row = [cell_text(cells.done[("tpu", s, length)]) for s in TPU_SETTINGS]
            print(f"| {length:,} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    define_flags()
    app.run(main)
