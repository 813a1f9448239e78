"""OLMoE-1B-7B's shape (Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language
Models", table 1 and its Hugging Face config): 16 layers of width 2048, 16 heads of 128 with
QK-norm, rotary positions, RMSNorm, no biases, an untied output; in every layer 64 SwiGLU
experts of width 1024, 8 per token (softmax router, top-k weights not renormalised),
load-balancing loss 0.01 and router z-loss 0.001; vocabulary 50,304, context 4096. 6.92B
parameters, 1.28B active per token.

For compiling on TPU topologies from any machine (tools.aot, docs/tpu.md): layers scanned,
rematerialised, bf16, state and batch over every chip (fsdp=-1); an expert layout is an
override, e.g. --config.mesh_shape.expert=4 --config.mesh_shape.fsdp=1. A training run needs
its own corpus and a tokenizer of this vocabulary (OLMoE's GPT-NeoX BPE, as a tokenizer.json).
"""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """OLMoE-1B-7B with gpt2_small.py's optimiser (OLMoE's own: AdamW 4e-4, betas 0.9/0.95,
    weight decay 0.1, clipping 1.0), 4 sequences of 4096 tokens per chip-step at first."""
    c = gpt2_small.get_config()
    c.model.update(
        vocab_size=50304,
        block_size=4096,
        num_layers=16,
        num_heads=16,
        embed_dim=2048,
        use_bias=False,
        position_embedding="rope",
        norm="rmsnorm",
        qk_norm=True,
        mlp_activation="swiglu",
        tie_embeddings=False,
        scan_layers=True,
        remat_policy="full",
        moe_num_experts=64,
        moe_top_k=8,
        moe_hidden_dim=1024,
        moe_norm_topk=False,
        moe_aux_loss_coef=0.01,
        moe_z_loss_coef=0.001,
    )
    c.learning_rate = 4e-4
    c.min_learning_rate = 4e-5
    c.batch_size = 16
    c.eval_batch_size = 16
    c.mesh_shape.data = 1
    c.mesh_shape.fsdp = -1
    return c
