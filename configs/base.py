"""Every field a run understands, with its default; experiment configs override a few of them.

This is also the schema: `config_validation.py` rejects keys that are not here. A field that
is unset by default is a typed `placeholder` holding None (never -1, 0 or '' standing for unset).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    """Returns the defaults shared by every experiment."""
    c = ml_collections.ConfigDict()

    # Task and data.
    c.task = "classification"  # 'classification' (images -> class) or 'lm' (next token)
    # A TFDS image set; for 'lm' a prepared token directory (data/prepare.py), a corpus name
    # ('tiny_shakespeare', 'kjv', 'tfds:NAME') or a text path, prepared on first use. Either
    # task: 'synthetic', random batches of the config's shapes (data/synthetic.py; fields below).
    c.dataset = "fashion_mnist"
    c.data_dir = placeholder(str)  # TFDS data dir; None: sources.default_data_dir()
    c.tokenizer = "char"  # lm: 'char', 'byte', 'sentencepiece', 'bpe' or a tokenizer.json path
    c.tokenizer_vocab_size = placeholder(int)  # sentencepiece only; None: its default size
    c.val_fraction = 0.1  # lm only: the last 10% of the corpus is validation (as nanoGPT)
    # lm only: True gives windows their documents (from the end-of-text separators preparation
    # puts after each one: segment ids, positions from 0 per document, no loss on the target
    # across a boundary) and the GPT attends only inside a document (T5's and MaxText's
    # packing; docs/data.md). False: nanoGPT's plain concatenated stream.
    c.packing = False
    c.augment = ml_collections.ConfigDict({"random_crop_pad": 0, "random_flip": False})
    # dataset='synthetic' only. Tokens take block_size and vocab_size from `model`, labels its
    # num_classes (one source: the data cannot disagree with the model's output).
    c.synthetic = ml_collections.ConfigDict(
        {
            "image_shape": (28, 28, 1),  # classification: one uint8 image [H, W, C]
            # An epoch, for num_epochs (examples; tokens for 'lm', as text data counts them).
            "num_train_examples": 60_000,
            "num_eval_examples": 10_000,  # classification: the 'test' split (lm: eval_steps)
        }
    )

    # Model: `name` is the file models/<name>.py (found by file name, models/__init__.py); the
    # other fields are its Model's constructor arguments.
    c.model = ml_collections.ConfigDict({"name": "mlp"})
    c.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32

    # Optimisation. An iteration is one optimizer update on `batch_size` examples.
    c.seed = 0
    c.batch_size = 128  # global batch, over all devices and processes
    c.grad_accum_steps = 1  # microbatches per step (batch_size must divide by it)
    # Training steps per compiled call (a lax.scan; Keras's steps_per_execution). Same updates,
    # less host work per step: worth it when steps are short. Lowered where needed to divide the
    # log, eval and checkpoint intervals (steps.effective_steps_per_dispatch); 1 under pmap.
    c.steps_per_dispatch = 1
    c.num_epochs = 10.0
    c.num_train_steps = placeholder(int)  # when set, overrides num_epochs
    # 'adamw', 'adam', 'lion', 'adafactor', 'muon' (hidden matrices; AdamW for the rest) or
    # 'sgd' (Nesterov momentum b1); optim.build_optimizer and docs/training.md.
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    # 'cosine' (warmup then cosine to min), 'linear' (warmup then linear to min), 'wsd'
    # (warmup-stable-decay) or 'constant' (after warmup); optim.learning_rate_schedule.
    c.lr_schedule = "cosine"
    c.warmup_steps = 0
    c.min_learning_rate = 0.0
    c.decay_steps = placeholder(int)  # where the decay ends, counted from 0; None: the whole run
    # wsd only: the last decay_fraction of decay_steps decays (Hägele et al. 2024 use 0.2), with
    # shape 'linear' or '1-sqrt' (lr * (1 - sqrt(progress)), their better cooldown).
    c.decay_fraction = 0.2
    c.decay_shape = "1-sqrt"
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    # Decoupled (lr * weight_decay * p per update; sgd: PyTorch's coupled L2) and on matrices
    # only: kernels and embeddings, never biases or normalization scales (optim._decay_mask).
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0  # global-norm clipping; 0 disables
    # muon only (optax.contrib.scale_by_muon): momentum and Newton-Schulz iterations (Jordan
    # 2024), and the RMS every matrix update is scaled to (Liu et al. 2025: 0.2 matches AdamW's,
    # so learning_rate and weight_decay carry over from an AdamW run).
    c.muon_momentum = 0.95
    c.muon_ns_steps = 5
    c.muon_update_rms = 0.2
    # adafactor only: True scales each update by the parameter's RMS (the paper's relative step,
    # learning_rate ~1e-2); False (default): learning_rate is an absolute step as for AdamW.
    c.adafactor_multiply_by_parameter_scale = False
    c.label_smoothing = 0.0
    # lm only: weight of the z-loss, weight * log(sum(exp(logits)))^2 per token, which keeps the
    # softmax normaliser near 1 (PaLM, Chowdhery et al. 2022, uses 1e-4); 0 disables.
    c.z_loss = 0.0
    c.skip_nonfinite_steps = False  # True: skip NaN/Inf updates and count them instead of stopping

    # Evaluation, logging, checkpoints.
    c.eval_every_steps = 500
    # Language models: batches of fixed windows per split at each evaluation (nanoGPT's
    # eval_iters); None: 20. Classifiers always evaluate every example of the split.
    c.eval_steps = placeholder(int)
    c.eval_batch_size = 1000
    c.log_every_steps = 100
    c.sample_every_eval = True  # lm only: log one short generated sample to TensorBoard per eval
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.restart = False  # True: ignore (and replace) checkpoints already in the workdir
    # (first_step, num_steps): a jax.profiler trace of those training steps (the update from
    # step s to s+1 is step s; whole compiled calls when steps_per_dispatch groups them) into
    # <workdir>/tensorboard/plugins/profile/; first_step >= 1: compilation stays out. None: off.
    c.profile_steps = placeholder(tuple)
    # Weights & Biases (tracking.py): the scalars, config and final metrics that TensorBoard
    # gets. 'disabled' never imports wandb; 'offline' writes the run under `dir` for a later
    # `wandb sync`; 'online' needs `wandb login` or WANDB_API_KEY (never prompts).
    c.wandb = ml_collections.ConfigDict(
        {
            "mode": "disabled",
            "project": "jaxlab",
            "entity": placeholder(str),  # None: the account's default entity
            "name": placeholder(str),  # None: the workdir's name
            "dir": placeholder(str),  # where wandb writes its files; None: the workdir
        }
    )

    # Parallelism.
    c.parallelism = "jit"  # 'jit' (NamedSharding over the mesh) or 'pmap' (data parallel)
    c.mesh_shape = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "context": 1, "tensor": 1, "expert": 1}
    )
    c.logical_axis_rules = ()  # overrides, e.g. (('embed', None),)

    # Fine-tuning: start from another run's checkpoint.
    c.init_from = ml_collections.ConfigDict(
        {
            "workdir": placeholder(str),  # the run to start from; None: train from scratch
            "step": placeholder(int),  # its checkpoint; None: the newest readable one
            "mode": "params",
            "freeze": (),
            # Path patterns ('head', 'h_1*') that start afresh instead of from the source
            # (docs/finetuning.md); a parameter that does not fit and is not named is refused.
            "reinit": (),
        }
    )
    return c
