"""The Hugging Face side of tests/test_hf_convert.py, run under .venv-torch (PyTorch and
`transformers`; `make torch-env`), never imported by jaxlab itself.

    .venv-torch/bin/python tests/hf_reference.py --build=DIR --corpus=FILE [--vocab_size=512]
    .venv-torch/bin/python tests/hf_reference.py --hf_dir=DIR --tokens=IN.npy --logits=OUT.npy \
        [--prompt=IN.npy --max_new_tokens=50 --generated=OUT.npy] [--text=IN.txt --ids=OUT.npy]

(both in one call: --build=DIR ... --hf_dir=DIR ... builds, then loads what it saved)

--build makes a small random GPT-2 (2 layers, width 64, 4 heads, 128 positions, GPT-2's
tanh-approximated GELU) with a byte-level BPE trained offline on the corpus with `tokenizers`,
and writes both with `save_pretrained`. The other flags load a directory with
`GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` (so an exported directory
is checked exactly as a user would load it) and write float32 logits [batch, length, vocab],
greedy `generate` output [batch, prompt + new] and the tokenizer's ids of a text, as .npy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

END_OF_TEXT = "<|endoftext|>"


def build(out: str, corpus: str, vocab_size: int, seed: int) -> None:
    """Trains the tokenizer, builds the random model and saves both to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    # GPT-2's own pipeline (its tokenizer.json): byte-level pre-tokenizer with GPT-2's regex,
    # no prefix space, byte-level decoder and post-processor, <|endoftext|> special.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text[i : i + 4096] for i in range(0, len(text), 4096)], trainer)
    hf_tok = GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    eot = tok.token_to_id(END_OF_TEXT)
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        # Larger than GPT-2's 0.02 so that logits are well apart: greedy decoding then does not
        # hinge on float rounding.
        initializer_range=0.2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(config).eval()
    # Random, not zero, biases and LayerNorm parameters, so every conversion is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)


def load(hf_dir: str):
    """The model and tokenizer as a user loads them."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return model, tokenizer


def main() -> None:
    """Parses the flags and does what they ask."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build")
    parser.add_argument("--corpus")
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf_dir")
    parser.add_argument("--tokens")
    parser.add_argument("--logits")
    parser.add_argument("--prompt")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--generated")
    parser.add_argument("--text")
    parser.add_argument("--ids")
    parser.add_argument("--info")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.build:
        build(args.build, args.corpus, args.vocab_size, args.seed)
    if not args.hf_dir:
        return
    model, tokenizer = load(args.hf_dir)
    if args.tokens:
        tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
        with torch.no_grad():
            logits = model(tokens).logits
        np.save(args.logits, logits.float().numpy())
    if args.prompt:
        prompt = torch.from_numpy(np.load(args.prompt).astype(np.int64))
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
        np.save(args.generated, out.numpy())
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        np.save(args.ids, np.asarray(tokenizer(text)["input_ids"], np.int64))
    if args.info:
        with open(args.info, "w") as f:
            json.dump(
                {"tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}, f
            )


if __name__ == "__main__":
    main()
