"""nanoGPT's config/train_shakespeare_char.py: the 'baby GPT' (6x6x384, block 256) on characters."""

import ml_collections

from configs import base
from configs.gpt_model import gpt_model


def get_config() -> ml_collections.ConfigDict:
    """Same hyperparameters as nanoGPT, same meaning of an iteration (one optimizer step)."""
    c = base.get_config()
    c.task = "lm"
    c.dataset = "tiny_shakespeare"
    c.tokenizer = "char"
    c.model = gpt_model(
        vocab_size=65,  # set from the tokenizer at run time
        block_size=256,
        num_layers=6,
        num_heads=6,
        embed_dim=384,
        dropout_rate=0.2,
        use_bias=False,  # nanoGPT's default
    )
    c.batch_size = 64
    c.num_train_steps = 5000
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-4
    c.warmup_steps = 100
    c.decay_steps = 5000
    c.b1 = 0.9
    c.b2 = 0.99
    c.weight_decay = 0.1
    c.grad_clip_norm = 1.0
    c.eval_every_steps = 250
    c.eval_steps = 200
    c.eval_batch_size = 64
    c.log_every_steps = 10
    c.checkpoint_every_steps = 250
    return c
