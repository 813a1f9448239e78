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
    # A TFDS image set; for 'lm' a prepared token directory (prepare_data.py), a corpus name
    # ('tiny_shakespeare', 'kjv', 'tfds:NAME') or a text path, prepared on first use.
    c.dataset = "fashion_mnist"
    c.data_dir = placeholder(str)  # TFDS data dir; None: data_setup.default_data_dir()
    c.tokenizer = "char"  # lm: 'char', 'byte', 'sentencepiece', 'bpe' or a tokenizer.json path
    c.tokenizer_vocab_size = placeholder(int)  # sentencepiece only; None: its default size
    c.val_fraction = 0.1  # lm only: the last 10% of the corpus is validation (as nanoGPT)
    c.augment = ml_collections.ConfigDict({"random_crop_pad": 0, "random_flip": False})

    # Model: `name` picks the family in models/__init__.py, the rest are its constructor kwargs.
    c.model = ml_collections.ConfigDict({"name": "mlp"})
    c.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32

    # Optimisation. An iteration is one optimizer update on `batch_size` examples.
    c.seed = 0
    c.batch_size = 128  # global batch, over all devices and processes
    c.grad_accum_steps = 1  # microbatches per step (batch_size must divide by it)
    # Training steps per compiled call (a lax.scan; Keras's steps_per_execution). Same updates,
    # less host work per step: worth it when steps are short. Lowered where needed to divide the
    # log, eval and checkpoint intervals (train.steps_per_dispatch); 1 under pmap.
    c.steps_per_dispatch = 1
    c.num_epochs = 10.0
    c.num_train_steps = placeholder(int)  # when set, overrides num_epochs
    c.optimizer = "adamw"  # 'adamw', 'adam', 'sgd' (with momentum b1)
    c.learning_rate = 1e-3
    c.lr_schedule = "cosine"  # 'cosine' (warmup then cosine to min) or 'constant' (after warmup)
    c.warmup_steps = 0
    c.min_learning_rate = 0.0
    c.decay_steps = placeholder(int)  # cosine length incl. warmup; None: the whole run
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0  # decoupled, applied to matrices only (no biases, norms, embeddings 1D)
    c.grad_clip_norm = 0.0  # global-norm clipping; 0 disables
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

    # Parallelism.
    c.parallelism = "jit"  # 'jit' (NamedSharding over the mesh) or 'pmap' (data parallel)
    c.mesh_shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # overrides, e.g. (('embed', None),)

    # Fine-tuning: start from another run's checkpoint.
    c.init_from = ml_collections.ConfigDict(
        {
            "workdir": placeholder(str),  # the run to start from; None: train from scratch
            "step": placeholder(int),  # its checkpoint; None: the newest readable one
            "mode": "params",
            "freeze": (),
        }
    )
    return c
