"""Ablation: packed against unpacked training on a corpus of many short documents, the King
James Bible one chapter a document (1,189 chapters, about 1,090 BPE tokens each), at the CPU
scale of configs/shakespeare_char_cpu.py (4 layers of width 128, block 64, batch 12) with a
byte-level BPE of 2,048 tokens. Results in docs/ablations.md.

.venv/bin/python scripts/kjv_chapters.py --out=.data/text/kjv_chapters.jsonl
.venv/bin/python -m data.prepare --source=.data/text/kjv_chapters.jsonl --tokenizer=bpe \
    --vocab_size=2048 --out=.data/tokens/kjv_chapters_bpe2048
python -m tools.sweep --sweep=configs/sweeps/packing_ablation.py --sweep_dir=runs/sweeps/packing
python -m tools.sweep --sweep=configs/sweeps/packing_ablation.py:quick \
    --sweep_dir=runs/sweeps/packing_q

Both settings train on the same windows of the same token stream (packing changes only the
attention mask, the positions and the loss weights inside a window: docs/data.md, "Packed
documents"), for the same steps, so on the same tokens. Each run's own val_loss is evaluated
the way it trained; to compare per document, evaluate both runs' final checkpoints with
packing=True (the commands are in docs/ablations.md).
"""

from __future__ import annotations

from typing import Any

DATA = {
    "dataset": ".data/tokens/kjv_chapters_bpe2048",
    "tokenizer": "bpe",
    "tokenizer_vocab_size": 2048,
}
# 1000 steps: half the CPU recipe's 2000, so that the sweep fits a shared 2-core CPU.
SHORT = {
    **DATA,
    "num_train_steps": 1000,
    "decay_steps": 1000,  # the cosine ends with the run, as in the 2000-step recipe
    "eval_every_steps": 250,
    "checkpoint_every_steps": 500,
}


def get_sweep(variant: str = "full") -> dict[str, Any]:
    """'full': packing False / True x 3 seeds (6 runs of 1000 steps);
    'quick': both settings, one seed, 200 steps (a check that the runs start and finish)."""
    settings = [{"packing": False}, {"packing": True}]
    if variant == "full":
        return {
            "config": "configs/shakespeare_char_cpu.py",
            "settings": settings,
            "seeds": [0, 1, 2],
            "fixed": SHORT,
            "metric": "val_loss",
        }
    if variant == "quick":
        return {
            "config": "configs/shakespeare_char_cpu.py",
            "settings": settings,
            "seeds": [0],
            "fixed": {
                **DATA,
                "num_train_steps": 200,
                "decay_steps": 200,
                "warmup_steps": 20,
                "eval_every_steps": 100,
                "checkpoint_every_steps": 200,
            },
            "metric": "val_loss",
        }
    raise ValueError(f"Unknown variant {variant!r}: use 'full' or 'quick'.")
