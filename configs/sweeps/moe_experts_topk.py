"""Ablation: the number of experts and experts per token of the Mixture-of-Experts GPT at the CPU
scale (configs/moe_cpu.py: 4 layers of width 128, block 64, batch 12) on Tiny Shakespeare
characters, at equal active FLOPs per token; and the dense model against the MoE. Results in
docs/ablations.md.

python -m tools.sweep --sweep=configs/sweeps/moe_experts_topk.py --sweep_dir=runs/sweeps/moe
python -m tools.sweep --sweep=configs/sweeps/moe_experts_topk.py:dense_vs_moe \
    --sweep_dir=runs/sweeps/moe_vs_dense
python -m tools.sweep --sweep=configs/sweeps/moe_experts_topk.py:quick --sweep_dir=runs/sweeps/moe_q

Each routing bundle keeps a token's feed-forward FLOPs at the dense model's (the dense MLP is
512 wide): top-1 routes to one expert 512 wide (Switch Transformer's choice), top-2 to two of
256 (Mixtral's k), so the experts' count changes only the parameters a token may draw on (4, 8
or 16 times the dense MLP's, over top_k).
"""

from __future__ import annotations

from typing import Any

ROUTING = {
    "top1": {"model.moe_top_k": 1, "model.moe_hidden_dim": 512},
    "top2": {"model.moe_top_k": 2, "model.moe_hidden_dim": 256},
}
# 1000 steps: half the CPU recipe's 2000, so that a sweep fits in an hour on a 2-core CPU.
SHORT = {
    "num_train_steps": 1000,
    "decay_steps": 1000,  # the cosine ends with the run, as in the 2000-step recipe
    "eval_every_steps": 250,
    "checkpoint_every_steps": 500,
}


def get_sweep(variant: str = "full") -> dict[str, Any]:
    """'full': 4, 8 and 16 experts x top-1 / top-2 x 3 seeds (18 runs of 1000 steps);
    'dense_vs_moe': the dense model (moe_num_experts=0: exactly configs/shakespeare_char_cpu.py's)
    against configs/moe_cpu.py (8 experts, top-2), 3 seeds each, 2000 steps;
    'quick': 4 and 8 experts, top-2, one seed, 200 steps (a few minutes)."""
    if variant == "full":
        return {
            "config": "configs/moe_cpu.py",
            "grid": {"model.moe_num_experts": [4, 8, 16], "routing": ROUTING},
            "seeds": [0, 1, 2],
            "fixed": SHORT,
            "metric": "val_loss",
        }
    if variant == "dense_vs_moe":
        return {
            "config": "configs/moe_cpu.py",
            "settings": [{"model.moe_num_experts": 0}, {"model.moe_num_experts": 8}],
            "seeds": [0, 1, 2],
            "metric": "val_loss",
        }
    if variant == "quick":
        return {
            "config": "configs/moe_cpu.py",
            "grid": {"model.moe_num_experts": [4, 8]},
            "seeds": [0],
            "fixed": {
                "num_train_steps": 200,
                "decay_steps": 200,
                "warmup_steps": 20,
                "eval_every_steps": 100,
                "checkpoint_every_steps": 200,
            },
            "metric": "val_loss",
        }
    raise ValueError(f"Unknown variant {variant!r}: use 'full', 'dense_vs_moe' or 'quick'.")
