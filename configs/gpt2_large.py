"""GPT-2 large's shape (36 layers, 20 heads, 1280 wide, block 1024; about 774M parameters) in bf16:
see gpt2_small.scaled."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """GPT-2 large's width and depth on configs/gpt2_small.py's recipe."""
    return gpt2_small.scaled(num_layers=36, num_heads=20, embed_dim=1280)
