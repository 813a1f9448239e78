"""Long sequences on a TPU slice, compiled here: docs/tpu.md's context-parallelism tables.

    python scripts/long_context_aot.py                       # the 32k table, then the searches
    python scripts/long_context_aot.py --models=small --settings=fsdp4,cp4_ring --remats=full
    python scripts/long_context_aot.py --nosearch             # the 32k table only

Each cell is one `python -m tools.aot ... --noeval` in its own process: the train step of GPT-2
small (configs/gpt2_small.py, vocabulary 50,304, its layers scanned) or the Llama-style GPU preset
(configs/llama_style_gpu.py) on `v5p:2x2x1` (4 chips), bf16 compute with float32 AdamW state,
global batch 4 (4 sequences a step: every setting holds the same tokens per chip), with remat
`none`, `full` or `dots_saveable`, in one of the settings:

- `fsdp4`: no context parallelism, the state sharded over the 4 chips (data=1, fsdp=4), one
  whole sequence per chip, and the explicit attention, which holds a layer's [heads x L x L]
  scores in float32 (`attention_impl='auto'` picks `plain_attention` where JAX's default
  backend is the CPU, as under tools.aot; on a TPU it would pick jax.nn.dot_product_attention's
  XLA path, which holds them too);
- `cp4_all_gather`, `cp4_ring`: every sequence split over the 4 chips (context=4, data=fsdp=1;
  models/context_parallel.py), keys and values all-gathered or passed around the ring.

First the table at 32,768 tokens per sequence; then, unless --nosearch, for each model,
setting and remat policy the longest sequence (a multiple of --search_unit tokens) whose train
step fits: doubling from --search_start, then bisection (tools.aot.largest_fitting). Cells are
appended to --out (JSON lines) as they finish and are not compiled again, so an interrupted
run resumes. Prints a line per cell, then the Markdown tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runtime import cli  # noqa: E402

GIB = 2**30
LENGTH = 32768

MODELS = {
    # Scanned layers (compile time flat in depth; the same function and memory per layer).
    "small": [
        "--config=configs/gpt2_small.py",
        "--config.model.vocab_size=50304",
        "--config.model.scan_layers=True",
    ],
    "llama": ["--config=configs/llama_style_gpu.py", "--config.model.vocab_size=50304"],
}
SETTINGS = {
    "fsdp4": ["--config.mesh_shape.data=1", "--config.mesh_shape.fsdp=4"],
    "cp4_all_gather": ["--config.mesh_shape.data=1", "--config.mesh_shape.context=4",
                       "--config.model.context_parallel=all_gather"],
    "cp4_ring": ["--config.mesh_shape.data=1", "--config.mesh_shape.context=4",
                 "--config.model.context_parallel=ring"],
}  # fmt: skip

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_list("models", list(MODELS), f"Of {list(MODELS)}.")
    flags.DEFINE_list("settings", list(SETTINGS), f"Of {list(SETTINGS)}.")
    flags.DEFINE_list(
        "remats",
        ["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"],
        "Remat policies.",
    )
    flags.DEFINE_string("topology", "v5p:2x2x1", "tools.aot's --topology.")
    flags.DEFINE_integer("batch_size", 4, "Global batch (sequences per step).")
    flags.DEFINE_bool("search", True, "Also search the longest sequence that fits.")
    flags.DEFINE_list("search_settings", ["fsdp4", "cp4_ring"], "Settings searched.")
    flags.DEFINE_integer("search_unit", 8192, "Searched lengths are multiples of this.")
    flags.DEFINE_integer("search_start", LENGTH, "The search's first length.")
    flags.DEFINE_integer("search_limit", 1 << 20, "The longest length tried.")
    flags.DEFINE_float("search_tolerance", 0.25, "Stop within this fraction (largest_fitting).")
    flags.DEFINE_string("out", "runs/long_context_aot.jsonl", "JSON lines, one per cell.")
    flags.DEFINE_integer("timeout_s", 3600, "Longest one compilation may take.")


def run_cell(model: str, setting: str, remat: str, length: int) -> dict:
    """One tools.aot run; its JSON result with the cell's names and the wall time added."""
    command = [sys.executable, "-m", "tools.aot", *MODELS[model], *SETTINGS[setting],
               f"--topology={FLAGS.topology}", f"--config.model.remat_policy={remat}",
               f"--config.model.block_size={length}", f"--config.batch_size={FLAGS.batch_size}",
               f"--config.eval_batch_size={FLAGS.batch_size}", "--noeval"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    started = time.time()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=FLAGS.timeout_s, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        result = {"train_fits": None, "timed_out": True}
    else:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
        result = json.loads(lines[-1])
    result.update(cell_model=model, cell_setting=setting, cell_remat=remat, cell_length=length,
                  cell_wall_s=round(time.time() - started, 1))  # fmt: skip
    return result


def cell_text(result: dict) -> str:
    """'14.76 GiB, 41 s', 'no (33.4 GiB)' or 'timed out'."""
    if result.get("timed_out"):
        return "timed out"
    if result.get("train_total_bytes") is None:
        needed = result.get("train_needed_gib_per_device")
        return f"no ({needed:.1f} GiB)" if needed is not None else "no"
    text = f"{result['train_total_bytes'] / GIB:.2f} GiB, {result['train_compile_s']:.0f} s"
    return text if result["train_fits"] else f"no ({text})"


class Cells:
    """The cells of --out, compiled on first use."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    key = (r["cell_model"], r["cell_setting"], r["cell_remat"], r["cell_length"])
                    self.done[key] = r

    def get(self, model: str, setting: str, remat: str, length: int) -> dict:
        key = (model, setting, remat, length)
        if key not in self.done:
            self.done[key] = run_cell(*key)
            with open(self.path, "a") as f:
                f.write(json.dumps(self.done[key]) + "\n")
            print(f"{model:6} {setting:15} remat {remat:13} L={length:7}: "
                  f"{cell_text(self.done[key])} (wall {self.done[key]['cell_wall_s']} s)",
                  flush=True)  # fmt: skip
        return self.done[key]


def longest(cells: Cells, model: str, setting: str, remat: str) -> tuple[int, int | None]:
    """(longest fitting length, shortest failing length probed or None) for one cell."""
    from tools.aot import largest_fitting

    unit = FLAGS.search_unit

    def fits(multiple: int) -> bool:
        return bool(cells.get(model, setting, remat, multiple * unit).get("train_fits"))

    best = largest_fitting(fits, FLAGS.search_start // unit, FLAGS.search_limit // unit,
                           FLAGS.search_tolerance) * unit  # fmt: skip
    failing = [k[3] for k, r in cells.done.items()
               if k[:3] == (model, setting, remat) and not r.get("train_fits")]  # fmt: skip
    return best, min(failing, default=None)


def main(argv: list[str]) -> None:
    """absl entry point: the cells not yet in --out, then the tables."""
    del argv
    unknown = sorted(set(FLAGS.models) - set(MODELS)) + sorted(
        set(FLAGS.settings + FLAGS.search_settings) - set(SETTINGS)
    )
    if unknown:
        raise cli.UserError(f"unknown {unknown}: models {list(MODELS)}, settings {list(SETTINGS)}")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    cells = Cells(FLAGS.out)
    for model in FLAGS.models:
        for setting in FLAGS.settings:
            for remat in FLAGS.remats:
                cells.get(model, setting, remat, LENGTH)
    searched = {}
    if FLAGS.search:
        for model in FLAGS.models:
            for setting in FLAGS.search_settings:
                for remat in FLAGS.remats:
                    searched[(model, setting, remat)] = longest(cells, model, setting, remat)
    import importlib.metadata

    versions = {p: importlib.metadata.version(p) for p in ("jax", "libtpu")}
    print(f"\njax {versions['jax']}, libtpu {versions['libtpu']}, {FLAGS.topology}, "
          f"global batch {FLAGS.batch_size}, {LENGTH} tokens per sequence")  # fmt: skip
    print("| model | setting | " + " | ".join(f"remat {r}" for r in FLAGS.remats) + " |")
    print("|---|---|" + "---|" * len(FLAGS.remats))
    for model in FLAGS.models:
        for setting in FLAGS.settings:
            row = [cell_text(cells.get(model, setting, r, LENGTH)) for r in FLAGS.remats]
            print(f"| {model} | {setting} | " + " | ".join(row) + " |")
    if searched:
        print("\nLongest sequence whose train step fits (shortest failing probe):")
        print("| model | setting | " + " | ".join(f"remat {r}" for r in FLAGS.remats) + " |")
        print("|---|---|" + "---|" * len(FLAGS.remats))
        for model in FLAGS.models:
            for setting in FLAGS.search_settings:
                row = []
                for remat in FLAGS.remats:
                    best, failing = searched[(model, setting, remat)]
                    row.append(f"{best:,} ({failing:,})" if failing else f"{best:,}")
                print(f"| {model} | {setting} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
