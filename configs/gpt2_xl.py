"""GPT-2 XL's shape (48 layers, 25 heads, 1600 wide, block 1024; about 1.5B parameters) in bf16:
see gpt2_small.scaled."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """GPT-2 xl's width and depth on configs/gpt2_small.py's recipe."""
    # Without rematerialisation the step needs 105 GiB per chip at batch 32 on 4 chips
    # (v5p:2x2x1); with it, 13 GiB (docs/tpu.md).
    return gpt2_small.scaled(num_layers=48, num_heads=25, embed_dim=1600, remat_policy="full")
