"""The 124M GPT-2 shape (12 layers, 12 heads, 768 wide, block 1024) for accelerators, in bf16."""

import ml_collections

from configs import shakespeare_char


def get_config() -> ml_collections.ConfigDict:
    """GPT-2 small with nanoGPT's train_gpt2 optimiser settings; byte-level tokens by default."""
    c = shakespeare_char.get_config()
    c.tokenizer = "byte"
    c.model.update(
        {
            "vocab_size": 256,
            "block_size": 1024,
            "num_layers": 12,
            "num_heads": 12,
            "embed_dim": 768,
            "dropout_rate": 0.0,
        }
    )
    c.dtype = "bfloat16"
    c.batch_size = 32
    c.num_train_steps = 5000
    c.learning_rate = 6e-4
    c.min_learning_rate = 6e-5
    c.warmup_steps = 200
    c.decay_steps = 5000
    c.b2 = 0.95
    c.eval_steps = 20
    c.eval_batch_size = 32
    c.mesh_shape.data = -1
    return c
