"""Ablation: depth of the CPU-sized character GPT (4 heads x 128 wide) on Tiny Shakespeare.

python -m tools.sweep --sweep=configs/sweeps/gpt_depth.py --sweep_dir=runs/sweeps/gpt_depth
python -m tools.sweep --sweep=configs/sweeps/gpt_depth.py:quick --sweep_dir=runs/sweeps/gpt_quick
"""

from __future__ import annotations

from typing import Any


def get_sweep(variant: str = "full") -> dict[str, Any]:
    """'full': 2, 4 and 6 layers x 3 seeds for the config's 2000 steps (9 runs);
    'quick': 2 and 4 layers x 2 seeds for 300 steps (4 runs, a few minutes on a CPU)."""
    if variant == "quick":
        return {
            "config": "configs/shakespeare_char_cpu.py",
            "grid": {"model.num_layers": [2, 4]},
            "seeds": [0, 1],
            "fixed": {
                "num_train_steps": 300,
                "decay_steps": 300,
                "warmup_steps": 30,
                "log_every_steps": 25,
                "eval_every_steps": 100,
                "checkpoint_every_steps": 300,
            },
        }
    if variant != "full":
        raise ValueError(f"Unknown variant {variant!r}: use 'full' or 'quick'.")
    return {
        "config": "configs/shakespeare_char_cpu.py",
        "grid": {"model.num_layers": [2, 4, 6]},
        "seeds": [0, 1, 2],
    }
