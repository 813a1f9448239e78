"""Ablation: the transformer block (GPT-2's vs RMSNorm+SwiGLU vs Llama-style) x the optimizer
(AdamW vs Muon), 3 seeds each, on Tiny Shakespeare characters at the CPU scale (4 layers of
width 128, block 64, batch 12: configs/shakespeare_char_cpu.py). Results in docs/ablations.md.

python -m tools.sweep --sweep=configs/sweeps/gpt_block_ablation.py --sweep_dir=runs/sweeps/block

The base config is the Llama-style preset (configs/llama_style_cpu.py), and each block is a
bundle of overrides on it:
  'gpt2':           LayerNorm + GELU MLP (4 x 128 wide), learned positions, multi-head
                    attention, tied output: exactly configs/shakespeare_char_cpu.py's model
                    (804,096 parameters; tests/test_sweep.py checks the equality);
  'rmsnorm_swiglu': the same but RMSNorm and a SwiGLU MLP 344 wide, 8/3 x 128 rounded up to a
                    multiple of 8 (Llama's rule), which keeps the MLP's parameters within 1% of
                    GPT-2's (808,192 in all);
  'llama':          the preset unchanged: RMSNorm, SwiGLU 384 wide, rotary positions, 2
                    key/value heads for 4 query heads, untied output (804,224 parameters).
Everything else is the CPU recipe's: no biases; AdamW's or Muon's learning rate 1e-3 with 100
warmup steps and cosine decay to 1e-4 over the run; weight decay 0.1 on matrices; clipping at
1. Muon scales its matrix updates to AdamW's RMS (config.muon_update_rms=0.2, Liu et al. 2025),
so the same learning rate and weight decay apply to both; AdamW handles Muon's non-matrix
parameters.
"""

from __future__ import annotations

from typing import Any

BLOCKS = {
    "gpt2": {
        "model.norm": "layernorm",
        "model.mlp_activation": "gelu",
        "model.mlp_hidden_dim": 512,
        "model.position_embedding": "learned",
        "model.num_kv_heads": 4,
        "model.tie_embeddings": True,
    },
    "rmsnorm_swiglu": {
        "model.norm": "rmsnorm",
        "model.mlp_activation": "swiglu",
        "model.mlp_hidden_dim": 344,
        "model.position_embedding": "learned",
        "model.num_kv_heads": 4,
        "model.tie_embeddings": True,
    },
    "llama": {},
}


def get_sweep() -> dict[str, Any]:
    """3 blocks x 2 optimizers x 3 seeds = 18 runs of 1000 steps: half the CPU recipe's 2000,
    so that the 18 runs fit in half an hour on a 2-core CPU (Muon's steps cost more)."""
    return {
        "config": "configs/llama_style_cpu.py",
        "grid": {"block": BLOCKS, "optimizer": ["adamw", "muon"]},
        "seeds": [0, 1, 2],
        "fixed": {
            "num_train_steps": 1000,
            "decay_steps": 1000,  # the cosine ends with the run, as in the 2000-step recipe
            "eval_every_steps": 250,  # 20 batches of each split: the curves in the plot
            "checkpoint_every_steps": 500,
        },
        "metric": "val_loss",
    }
