"""Ablation: the small CNN's conv width x peak learning rate on Fashion-MNIST, several seeds.

python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py --sweep_dir=runs/sweeps/cnn
python -m tools.sweep --sweep=configs/sweeps/cnn_width_lr.py:quick --sweep_dir=runs/sweeps/cnn_quick
"""

from __future__ import annotations

from typing import Any


def get_sweep(variant: str = "full") -> dict[str, Any]:
    """'full': 3 widths x 3 learning rates x 3 seeds at the config's 15 epochs (27 runs);
    'quick': 2 widths x 2 learning rates x 2 seeds at 2 epochs (8 runs, minutes on a CPU)."""
    if variant == "quick":
        return {
            "config": "configs/fashion_mnist_cnn.py",
            "grid": {"model.conv_features": [(32,), (64,)], "learning_rate": [1e-3, 3e-3]},
            "seeds": [0, 1],
            # 2 epochs = 938 steps; a test-set evaluation (~1 s) every 300 steps for the curves.
            "fixed": {"num_epochs": 2.0, "log_every_steps": 100, "eval_every_steps": 300},
        }
    if variant != "full":
        raise ValueError(f"Unknown variant {variant!r}: use 'full' or 'quick'.")
    return {
        "config": "configs/fashion_mnist_cnn.py",
        "grid": {
            "model.conv_features": [(16,), (32,), (64,)],
            "learning_rate": [3e-4, 1e-3, 3e-3],
        },
        "seeds": [0, 1, 2],
    }
