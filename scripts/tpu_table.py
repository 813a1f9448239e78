"""Reproduces docs/tpu.md's batch-32 table: GPT-2 small to XL compiled for TPU topologies here.

    python scripts/tpu_table.py                                  # every model x topology x remat
    python scripts/tpu_table.py --models=small,xl --topologies=tpu7x:2x2x1 --remats=full

Each cell is one `python -m tools.aot ... --noeval` in its own process (so one compilation's
memory is freed before the next): the train step at global batch 32, block 1024, vocabulary
50,304, bf16 compute with float32 AdamW state, FSDP over the chips of a slice, with remat `none`
or `full`. Cells are appended to --out (JSON lines) as they finish, and cells already there are
not compiled again, so an interrupted table resumes. Prints a line per cell, then the Markdown
table: per-chip GiB and the train step's compile time, or "no (N)" where XLA refused the program
(N GiB being what it counted).

    python scripts/tpu_table.py --find_max_batch                 # the largest-batch column

With --find_max_batch each cell is instead a model x topology's search for the largest global
batch with remat `full` (`tools.aot --find_max_batch --remat_policies=full
--search_tolerance=0.25`), started at the batch in SEARCH_START (the previous compiler's
answer: starting near it saves compilations), appended to runs/tpu_largest.jsonl.
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

# GPT-2 small's shape through gpt2_medium.py (which scans its layers), as docs/tpu.md's SMALL.
MODELS = {
    "small": ["--config=configs/gpt2_medium.py", "--config.model.num_layers=12",
              "--config.model.num_heads=12", "--config.model.embed_dim=768"],
    "medium": ["--config=configs/gpt2_medium.py"],
    "large": ["--config=configs/gpt2_large.py"],
    "xl": ["--config=configs/gpt2_xl.py"],
}  # fmt: skip
# Topology column -> tools.aot flags. "v5e:2x2x2s" is two v5e:2x2 slices (data over slices).
TOPOLOGIES = {
    "v5p:2x2x1": ["--topology=v5p:2x2x1"],
    "v5e:2x2": ["--topology=v5e:2x2"],
    "v6e:2x2": ["--topology=v6e:2x2"],
    "tpu7x:2x2x1": ["--topology=tpu7x:2x2x1"],
    "v5e:2x2x2s": ["--topology=v5e:2x2", "--num_slices=2", "--config.mesh_shape.data=2",
                   "--config.mesh_shape.fsdp=-1"],
}  # fmt: skip

# Where each largest-batch search starts (--config.batch_size), the starts of docs/tpu.md's
# table: libtpu 0.0.42.1's answers (v5p medium and large: a step below them; TPU7x: v5p's).
# The search doubles from there, then bisects.
SEARCH_START = {
    ("small", "v5p:2x2x1"): 2560, ("small", "v5e:2x2"): 320, ("small", "v6e:2x2"): 768,
    ("small", "v5e:2x2x2s"): 768, ("small", "tpu7x:2x2x1"): 2560,
    ("medium", "v5p:2x2x1"): 1280, ("medium", "v5e:2x2"): 128, ("medium", "v6e:2x2"): 320,
    ("medium", "v5e:2x2x2s"): 256, ("medium", "tpu7x:2x2x1"): 1280,
    ("large", "v5p:2x2x1"): 896, ("large", "v5e:2x2"): 96, ("large", "v6e:2x2"): 224,
    ("large", "v5e:2x2x2s"): 160, ("large", "tpu7x:2x2x1"): 896,
    ("xl", "v5p:2x2x1"): 640, ("xl", "v5e:2x2"): 40, ("xl", "v6e:2x2"): 128,
    ("xl", "v5e:2x2x2s"): 80, ("xl", "tpu7x:2x2x1"): 640,
}  # fmt: skip

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_list("models", list(MODELS), f"Of {list(MODELS)}.")
    flags.DEFINE_list("topologies", list(TOPOLOGIES), f"Of {list(TOPOLOGIES)}.")
    flags.DEFINE_list("remats", ["none", "full"], "Remat policies.")
    flags.DEFINE_integer("batch_size", 32, "Global batch.")
    flags.DEFINE_string(
        "out", None, "JSON lines, one per cell (resumable); default runs/tpu_table.jsonl "
        "(--find_max_batch: runs/tpu_largest.jsonl).",
    )  # fmt: skip
    flags.DEFINE_integer("timeout_s", 1800, "Longest one cell may take.")
    flags.DEFINE_bool("find_max_batch", False, "Search each cell's largest batch (remat full).")


def run_cell(model: str, topology: str, remat: str) -> dict:
    """One tools.aot run; its JSON result with the cell's names and the wall time added."""
    batch = SEARCH_START[(model, topology)] if FLAGS.find_max_batch else FLAGS.batch_size
    command = [sys.executable, "-m", "tools.aot", *MODELS[model], *TOPOLOGIES[topology],
               f"--config.model.remat_policy={remat}", f"--config.batch_size={batch}",
               "--noeval"]  # fmt: skip
    if FLAGS.find_max_batch:
        command += ["--find_max_batch", "--remat_policies=full", "--search_tolerance=0.25"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    started = time.time()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=FLAGS.timeout_s, env=env)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result.update(cell_model=model, cell_topology=topology, cell_remat=remat,
                  cell_wall_s=round(time.time() - started, 1))  # fmt: skip
    return result


def cell_text(result: dict) -> str:
    """'14.76 GiB, 41 s' or 'no (33.4)'; for a search, '2,560 (3,072: 103.6 GiB; 87.39 GiB at
    2,560; 5 compiles, 141 s)'."""
    if "max_batch" in result:
        found = result["max_batch"][0]
        failing = found["smallest_failing_batch"]
        probe = next((p for p in found["probes"] if p["batch"] == failing), {})
        needs = probe.get("total_bytes")
        over = f"{failing:,}: " + ("refused" if needs is None else f"{needs / GIB:.1f} GiB")
        at = found["total_bytes_at_max"]
        at = "?" if at is None else f"{at / GIB:.2f}"
        return (f"{found['max_global_batch']:,} ({over}; {at} GiB at "
                f"{found['max_global_batch']:,}; {found['compiles']} compiles, "
                f"{result['cell_wall_s']:,.0f} s)")  # fmt: skip
    if result.get("train_total_bytes") is None:
        needed = result.get("train_needed_gib_per_device")
        return f"no ({needed:.1f})" if needed is not None else "no"
    text = f"{result['train_total_bytes'] / GIB:.2f} GiB, {result['train_compile_s']:.0f} s"
    return text if result["train_fits"] else f"{text} (over HBM)"


def main(argv: list[str]) -> None:
    """absl entry point: every cell not yet in --out, then the table."""
    del argv
    unknown = sorted(set(FLAGS.models) - set(MODELS)) + sorted(
        set(FLAGS.topologies) - set(TOPOLOGIES)
    )
    if unknown:
        raise cli.UserError(
            f"unknown {unknown}: models are {list(MODELS)}, topologies {list(TOPOLOGIES)}"
        )
    remats = ["full"] if FLAGS.find_max_batch else FLAGS.remats
    default = "runs/tpu_largest.jsonl" if FLAGS.find_max_batch else "runs/tpu_table.jsonl"
    out = FLAGS.out or default
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    done = {}
    if os.path.exists(out):
        with open(out) as f:
            for line in f:
                r = json.loads(line)
                done[(r["cell_model"], r["cell_topology"], r["cell_remat"])] = r
    for model in FLAGS.models:
        for topology in FLAGS.topologies:
            for remat in remats:
                key = (model, topology, remat)
                if key not in done:
                    done[key] = run_cell(*key)
                    with open(out, "a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                print(f"{model:6} {topology:12} remat {remat:5}: {cell_text(done[key])} "
                      f"(wall {done[key]['cell_wall_s']} s)", flush=True)  # fmt: skip
    import importlib.metadata

    versions = {p: importlib.metadata.version(p) for p in ("jax", "libtpu")}
    batch = "largest" if FLAGS.find_max_batch else FLAGS.batch_size
    print(f"\njax {versions['jax']}, libtpu {versions['libtpu']}, batch {batch}")
    print("| model | topology | " + " | ".join(f"remat {r}" for r in remats) + " |")
    print("|---|---|" + "---|" * len(remats))
    for model in FLAGS.models:
        for topology in FLAGS.topologies:
            cells = [cell_text(done[(model, topology, r)]) for r in remats]
            print(f"| {model} | {topology} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
