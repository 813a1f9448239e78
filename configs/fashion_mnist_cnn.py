"""Fashion-MNIST with the Keras small CNN (conv32-pool-dense128-dense10); recipe beats 91.9%."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The small CNN config."""
    c = base.get_config()
    c.model = ml_collections.ConfigDict(
        {"name": "cnn", "conv_features": (32,), "dense_features": (128,), "num_classes": 10}
    )
    c.batch_size = 128
    c.num_epochs = 15.0
    c.learning_rate = 1e-3
    c.warmup_steps = 200
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.augment.random_flip = True
    c.eval_every_steps = 2000
    c.log_every_steps = 500
    c.checkpoint_every_steps = 2000
    c.steps_per_dispatch = 20  # fewer host round trips between ~9 ms steps (1.15x faster here)
    return c
