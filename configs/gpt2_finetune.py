"""Fine-tune a pretrained GPT-2 on Tiny Shakespeare: nanoGPT's config/finetune_shakespeare.py.

    python train.py --config=configs/gpt2_finetune.py:runs/gpt2 --workdir=runs/gpt2_shakespeare

The part after the colon is the model to start from: a workdir written by
`python -m tools.hf_convert import` (or any jaxlab GPT run), or a Hugging Face GPT-2 directory.
The model's shape and its GPT-2 tokenizer are read from the source's description (the run's
config.json, or the Hugging Face config.json through hf.importing.source_config), so every
parameter is copied; `init_from` names the source; the rest is nanoGPT's fine-tuning recipe.
This config only reads: a Hugging Face directory is imported (once, into a cache) when the run
starts (finetune.py), not here.
"""

import os

import ml_collections

from hf import gpt2_files, importing
from runtime import cli, workdir_files


def get_config(source: str | None = None) -> ml_collections.ConfigDict:
    """nanoGPT's finetune_shakespeare.py (init_from gpt2-xl there): 20 iterations of 32 windows
    of block_size tokens (batch 1 x 32 gradient-accumulation steps there; 32 x 1 microbatch of 1
    here, the same update), constant learning rate 3e-5, evaluations every 5 iterations on 40
    windows per split, AdamW (b2 0.95, weight decay 0.1, clip 1.0), no dropout.

    Raises cli.UserError when `source` is missing or not a run/GPT-2 directory (an
    hf.gpt2_files.HFConvertError for a Hugging Face directory jaxlab cannot use)."""
    if not source:
        raise cli.UserError(
            "configs/gpt2_finetune.py needs the model to start from after a colon: "
            "--config=configs/gpt2_finetune.py:runs/gpt2 (an imported workdir or a Hugging Face "
            "GPT-2 directory)."
        )
    source = os.path.expanduser(source)
    if gpt2_files.is_hugging_face_dir(source):
        c = importing.source_config(source)
    else:
        try:
            c = workdir_files.load_config(source)
        except FileNotFoundError as e:
            raise cli.UserError(
                f"{source} is neither a jaxlab workdir nor a Hugging Face GPT-2 directory ({e})."
            ) from e
        # The pretrained model's own tokenizer (a Hugging Face tokenizer.json), so that the
        # data is tokenized as in pretraining and the embedding rows are copied.
        bpe = os.path.join(source, "tokenizer_bpe.json")
        if os.path.isfile(bpe):
            c.tokenizer, c.tokenizer_vocab_size = bpe, None
    # The source by name; finetune.py restores it (importing a Hugging Face directory first).
    c.init_from = ml_collections.ConfigDict(
        {"workdir": source, "step": None, "mode": "params", "freeze": (), "reinit": ()}
    )
    c.restart = False
    c.dataset = "tiny_shakespeare"
    c.model.dropout_rate = 0.0
    c.batch_size = 32
    c.grad_accum_steps = 32
    c.num_train_steps = 20
    c.learning_rate = 3e-5
    c.lr_schedule = "constant"
    c.warmup_steps = 0
    c.min_learning_rate = 3e-5
    c.decay_steps = None
    c.b1, c.b2 = 0.9, 0.95
    c.weight_decay = 0.1
    c.grad_clip_norm = 1.0
    c.eval_every_steps = 5
    # nanoGPT's eval_iters=40 at batch 1: 40 windows per split, here 5 batches of 8.
    c.eval_steps = 5
    c.eval_batch_size = 8
    c.log_every_steps = 1
    c.checkpoint_every_steps = 20
    c.steps_per_dispatch = 1
    return c
