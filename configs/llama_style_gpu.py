"""A Llama-style GPT (RMSNorm, SwiGLU, rotary positions, grouped-query attention, no biases,
untied output) at GPT-2 small's shape for accelerators, in bf16, with gpt2_small.py's
optimiser, batch and schedule."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
    """12 layers of width 768, 12 query heads sharing 4 key/value heads (head_dim 64), block
    1024, SwiGLU width 2048 (= 8/3 * 768, Llama's rule, so the MLP has GPT-2's 8 e^2
    parameters), vocabulary padded to a multiple of 128 for the accelerators' matmul tiles.

    75.5M parameters in the blocks; with GPT-2's 50,257-token BPE the two untied embeddings
    add 2 x 50,304 x 768 (152.8M in all). The default stand-in tokenizer is
    gpt2_small.py's bytes (256 tokens). Every variant field is set, so each is settable from
    the command line.
    """
    c = gpt2_small.get_config()
    c.model.update(
        {
            "position_embedding": "rope",
            "norm": "rmsnorm",
            "norm_epsilon": 1e-5,
            "qk_norm": False,
            "mlp_activation": "swiglu",
            "mlp_hidden_dim": 2048,
            "num_kv_heads": 4,
            "tie_embeddings": False,
            "vocab_pad_multiple": 128,
            "scan_layers": True,  # compile time independent of depth
        }
    )
    return c
