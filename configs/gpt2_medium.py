"""GPT-2 medium's shape (24 layers, 16 heads, 1024 wide, block 1024; about 350M parameters) in bf16:
see gpt2_small.scaled."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """GPT-2 medium's width and depth on configs/gpt2_small.py's recipe."""
    return gpt2_small.scaled(num_layers=24, num_heads=16, embed_dim=1024)
