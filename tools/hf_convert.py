"""Hugging Face GPT-2 checkpoints in and out of jaxlab: a GPT-2 directory becomes a jaxlab run's
workdir, and a jaxlab GPT run becomes a GPT-2 directory.

    python -m tools.hf_convert import --hf_dir=DIR --workdir=DIR [--vocab_pad_multiple=64]
        [--scan_layers] [--dtype=float32]
    python -m tools.hf_convert export --workdir=DIR --hf_dir=DIR [--step=N] [--dtype=float32]

Import reads `config.json` (model_type 'gpt2'), `model.safetensors` (or a sharded
`model.safetensors.index.json`) with safetensors' NumPy API (no PyTorch), and the tokenizer
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`), and writes a workdir exactly as
train.py does: `config.json` (configs/gpt2_small.py's training settings with this model's
shape), `input_spec.json`, the tokenizer files and a verified Orbax checkpoint at step 0, so that
sample.py, evaluate.py, tools.aot (through configs/gpt2_finetune.py) and `config.init_from` use
it like any run. Export restores a run through `experiment.restore_run` and writes
`config.json`, `model.safetensors` (keys as `save_pretrained` names them) and the tokenizer
files, which `transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained`
load. A model GPT-2's architecture cannot express is refused with the reasons.

This file is only the command; the library is the hf/ package at the repository root, which
never imports tools/: hf/gpt2_files.py (reading and checking the directory), hf/gpt2_layout.py
(the two parameter layouts, and what GPT-2 cannot express), hf/importing.py (also what
finetune.py uses to import a directory named by `config.init_from.workdir` when a run starts)
and hf/exporting.py.
"""

from __future__ import annotations

import sys
import time

from hf.exporting import export_hf
from hf.gpt2_files import HFConvertError
from hf.importing import import_hf
from runtime import cli

COMMANDS = ("import", "export")


def main(command: str | None, argv: list[str]) -> None:
    """Runs `import` or `export` with the flags; prints what it wrote and how long it took."""
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    if command not in COMMANDS:
        raise HFConvertError(
            f"give a command first: python -m tools.hf_convert {{{'|'.join(COMMANDS)}}} "
            f"(got {command!r})."
        )
    for name in ("hf_dir", "workdir"):
        if not getattr(FLAGS, name):
            raise HFConvertError(f"{command} needs --{name}.")
    start = time.perf_counter()
    if command == "import":
        workdir = import_hf(
            FLAGS.hf_dir,
            FLAGS.workdir,
            vocab_pad_multiple=FLAGS.vocab_pad_multiple,
            scan_layers=FLAGS.scan_layers,
            dtype=FLAGS.dtype,
        )
        print(f"Imported {FLAGS.hf_dir} into {workdir} (step 0) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    else:
        export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step, FLAGS.dtype)
        print(f"Exported {FLAGS.workdir} to {FLAGS.hf_dir} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    from absl import flags

    flags.DEFINE_string("hf_dir", None, "The Hugging Face GPT-2 directory (read or written).")
    flags.DEFINE_string("workdir", None, "The jaxlab workdir (written or read).")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the newest).")
    flags.DEFINE_integer(
        "vocab_pad_multiple",
        1,
        "import: pad the embedding rows to a multiple of this (64: 50,304).",
    )
    flags.DEFINE_bool("scan_layers", False, "import: store the blocks stacked for nn.scan.")
    flags.DEFINE_string("dtype", "float32", "import: the run's compute dtype; export: the "
                        "safetensors dtype (float32, bfloat16, float16).")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    # The command is the first argument (`import` or `export`); absl takes the flags after it.
    command = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    cli.run(lambda argv: main(command, argv))
