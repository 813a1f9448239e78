"""Mixtral-8x7B's shape (Jiang et al. 2024, "Mixtral of Experts", table 1): 32 layers of width
4096, 32 query heads of 128 sharing 8 key/value heads, rotary positions, RMSNorm, no biases, an
untied output; in every layer 8 SwiGLU experts of width 14,336, 2 per token (softmax over the
top-2: the top-k weights renormalised); vocabulary 32,000. 46.7B parameters, 12.9B active.

For compiling on TPU topologies from any machine (tools.aot, docs/tpu.md): layers scanned,
rematerialised, bf16, sequences of 4096 (Mixtral's context is 32k; its rotary base is 1e6, which
the GPT does not set: it changes no shape), state and batch over every chip (fsdp=-1); an expert
layout is an override, e.g. --config.mesh_shape.expert=8 --config.mesh_shape.fsdp=-1.
"""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """Mixtral-8x7B with gpt2_small.py's optimiser; 8 sequences of 4096 tokens per step."""
    c = gpt2_small.get_config()
    c.model.update(
        vocab_size=32000,
        block_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        use_bias=False,
        position_embedding="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        tie_embeddings=False,
        scan_layers=True,
        remat_policy="full",
        moe_num_experts=8,
        moe_top_k=2,
        moe_hidden_dim=14336,
        moe_norm_topk=True,
    )
    c.batch_size = 8
    c.eval_batch_size = 8
    c.mesh_shape.data = 1
    c.mesh_shape.fsdp = -1
    return c
