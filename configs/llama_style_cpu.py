"""A Llama-style GPT (RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases,
untied output) at the CPU scale of shakespeare_char_cpu.py, on the same Tiny Shakespeare
characters with the same optimiser, batch and schedule: the two differ only in the block."""

import ml_collections

from configs import shakespeare_char_cpu


def get_config() -> ml_collections.ConfigDict:
    """4 layers of width 128, 4 query heads sharing 2 key/value heads (head_dim 32), block 64.

    The SwiGLU width 384 = 3 * embed_dim makes each block's matrices exactly as large as
    GPT-2's (attention 3 e^2 with two kv heads of four, MLP 3 * e * 3e = 9 e^2: 12 e^2 in all),
    so the parameter counts match but for the untied head (+ vocab * embed) and the absent
    position table (- block_size * embed): with the 65 characters, 804,224 parameters against
    shakespeare_char_cpu.py's 804,096. Every variant field is set, so each is settable from
    the command line (e.g. --config.model.attn_logit_softcap=30 or --config.model.qk_norm=True).
    """
    c = shakespeare_char_cpu.get_config()
    c.model.update(
        {
            "use_bias": False,
            "position_embedding": "rope",
            "norm": "rmsnorm",
            "norm_epsilon": 1e-5,  # Llama 2's rms_norm_eps
            "qk_norm": False,
            "mlp_activation": "swiglu",
            "mlp_hidden_dim": 384,
            "num_kv_heads": 2,
            "tie_embeddings": False,
            "vocab_pad_multiple": 1,
        }
    )
    return c
