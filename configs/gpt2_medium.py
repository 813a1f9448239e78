"""GPT-2 medium's shape (24 layers, 16 heads, 1024 wide, block 1024; about 350M parameters) in bf16,
its layers scanned (model.scan_layers) and its state sharded over every chip (FSDP)."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """configs/gpt2_small.py (optimiser, batch, schedule) with GPT-2 medium's width and depth.

    vocab_size=50304 is GPT-2's 50,257 BPE tokens padded to a multiple of 64: the shape that
    `python -m tools.aot` compiles, which builds the model from the config alone. A training
    run sets vocab_size from its tokenizer instead (config.tokenizer='byte', inherited from
    gpt2_small: 256), so train.py trains this shape with a 256-token vocabulary.
    """
    c = gpt2_small.get_config()
    c.model.update(
        num_layers=24,
        num_heads=16,
        embed_dim=1024,
        vocab_size=50304,  # see the docstring: a tokenizer replaces it at training time
        scan_layers=True,  # compile time independent of depth
        remat_policy="none",  # or "full" / "dots_saveable": see tools.aot --find_max_batch
    )
    # Parameters, gradients and AdamW's moments split over all chips (ZeRO-3), the batch too.
    c.mesh_shape.data = 1
    c.mesh_shape.fsdp = -1
    return c
