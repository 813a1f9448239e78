"""A Mixture-of-Experts GPT at the CPU scale of shakespeare_char_cpu.py (4 layers of width 128,
block 64, batch 12, 2000 steps, the same optimiser and schedule) on the same Tiny Shakespeare
characters: the two differ only in the feed-forward layers.

Every block's MLP (width 512) becomes 8 experts of width 256 with top-2 routing (softmax router,
Switch's load-balancing loss 0.01, ST-MoE's router z-loss 0.001, dropless dispatch): a token
uses two experts of half the dense width, so its feed-forward FLOPs are the dense model's (plus
the router's 128 x 8), while the experts hold 4x its feed-forward parameters: 2,381,056
parameters in all, 808,192 active per token, against the dense 804,096 (configs/sweeps/
moe_experts_topk.py varies experts and top-k; docs/ablations.md compares them).
"""

import ml_collections

from configs import shakespeare_char_cpu


def get_config() -> ml_collections.ConfigDict:
    """shakespeare_char_cpu.py with 8 experts of width 256, top-2, in every block."""
    c = shakespeare_char_cpu.get_config()
    c.model.update(
        {
            "moe_num_experts": 8,
            "moe_top_k": 2,
            "moe_hidden_dim": 256,
            "moe_router": "softmax",
            "moe_dispatch": "dropless",
            "moe_aux_loss_coef": 0.01,
            "moe_z_loss_coef": 0.001,
        }
    )
    return c
