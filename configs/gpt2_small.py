"""The 124M GPT-2 shape (12 layers, 12 heads, 768 wide, block 1024) for accelerators, in bf16."""

import ml_collections

from configs import base
from configs.gpt_model import gpt_model


def get_config() -> ml_collections.ConfigDict:
    """GPT-2 small with nanoGPT's train_gpt2 optimiser settings; byte-level tokens by default.

    Every field that differs from configs/base.py is set here. The dataset is a stand-in that
    is available offline, so the config runs (and benchmarks) anywhere: a real GPT-2 run points
    `--config.dataset` at its own corpus (a .txt path).
    """
    c = base.get_config()
    c.task = "lm"
    c.dataset = "tiny_shakespeare"  # stand-in corpus: see the docstring
    c.tokenizer = "byte"
    c.model = gpt_model(
        vocab_size=256,  # set from the tokenizer at run time
        block_size=1024,
        num_layers=12,
        num_heads=12,
        embed_dim=768,
        dropout_rate=0.0,
        use_bias=False,
        remat_policy="none",  # 'full' or 'dots_saveable' trade compute for memory
        scan_layers=False,  # True: layers under nn.scan (compile time flat in depth)
    )
    c.dtype = "bfloat16"
    c.batch_size = 32
    c.num_train_steps = 5000
    c.learning_rate = 6e-4
    c.min_learning_rate = 6e-5
    c.warmup_steps = 200
    c.decay_steps = 5000
    c.b2 = 0.95
    c.weight_decay = 0.1
    c.grad_clip_norm = 1.0
    c.eval_every_steps = 250
    c.eval_steps = 20
    c.eval_batch_size = 32
    c.log_every_steps = 10
    c.checkpoint_every_steps = 250
    c.mesh_shape.data = -1
    return c


def scaled(
    num_layers: int, num_heads: int, embed_dim: int, remat_policy: str = "none"
) -> ml_collections.ConfigDict:
    """This config (optimiser, batch, schedule) at a larger GPT-2 width and depth, its layers
    scanned (model.scan_layers: compile time independent of depth) and its state sharded over
    every chip (FSDP): the base of gpt2_medium.py, gpt2_large.py and gpt2_xl.py.

    vocab_size=50304 is GPT-2's 50,257 BPE tokens padded to a multiple of 64: the shape that
    `python -m tools.aot` compiles, which builds the model from the config alone. A training
    run sets vocab_size from its tokenizer instead (config.tokenizer='byte': 256).
    """
    c = get_config()
    c.model.update(
        num_layers=num_layers,
        num_heads=num_heads,
        embed_dim=embed_dim,
        vocab_size=50304,  # see the docstring: a tokenizer replaces it at training time
        scan_layers=True,
        remat_policy=remat_policy,  # "none", "full", "dots_saveable": tools.aot --find_max_batch
    )
    # Parameters, gradients and AdamW's moments split over all chips (ZeRO-3), the batch too.
    c.mesh_shape.data = 1
    c.mesh_shape.fsdp = -1
    return c
