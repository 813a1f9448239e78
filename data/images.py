"""tf.data pipelines over TFDS image datasets (the only part of jaxlab that needs TensorFlow).

Every training batch is a pure function of (seed, step, process): the pipeline for step s draws
the global batch's example indices from a stateless generator keyed by (seed, s) and each process
keeps its own slice. Resuming at step s is `train_batches(start_step=s)`: no iterator state to
save, no data repeated or skipped, and N processes together see exactly the batch one would.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from runtime import cli

cli.quiet_tensorflow()
import tensorflow as tf  # noqa: E402

from data import (  # noqa: E402
    Batch,
    Datasets,
    sources,  # noqa: E402
)

# tf.data is only the host-side feeder here: keep TensorFlow off any accelerator.
tf.config.set_visible_devices([], "GPU")


def local_batch_size(global_batch: int) -> int:
    """This process's share of a global batch."""
    if global_batch % jax.process_count():
        raise ValueError(
            f"batch size {global_batch} does not divide over {jax.process_count()} processes."
        )
    return global_batch // jax.process_count()


def _process_slice(global_batch: int) -> tf.Tensor:
    """Positions of this process's examples inside a global batch."""
    local = local_batch_size(global_batch)
    start = jax.process_index() * local
    return tf.range(start, start + local, dtype=tf.int64)


def _step_batches(
    make_stack, start_step: int = 0, steps_per_dispatch: int = 1, stop_step: int = 2**62
) -> Iterator[Batch]:
    """The batches of steps start_step, ..., stop_step - 1.

    make_stack(steps: int64[n]) -> the batches of those steps stacked on a leading axis [n, ...];
    the batch of a step must not depend on the others in its stack. With steps_per_dispatch=k > 1
    the iterator yields stacks of k consecutive steps ([k, batch, ...]) that start on multiples of
    k; a first, shorter stack reaches the next multiple when start_step is not one (a run resumed
    with another k), and the last is cut short by stop_step. With k=1 it yields single batches.
    One tf.data map builds a whole stack (vectorised over its steps), so the host pays one op
    dispatch and one `next()` per k steps.
    """
    k = int(steps_per_dispatch)

    def steps_of_stack(j):
        first = tf.maximum(j * k, start_step)
        return tf.range(first, tf.minimum((j + 1) * k, stop_step), dtype=tf.int64)

    first_stack = start_step // k
    end_stack = -(-stop_step // k) if stop_step > start_step else first_stack  # none if empty
    ds = tf.data.Dataset.range(first_stack, end_stack)
    ds = ds.map(
        lambda j: make_stack(steps_of_stack(j)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if k == 1:
        ds = ds.unbatch()  # stacks of one -> the batch itself
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _data_dir(config: ml_collections.ConfigDict) -> str:
    return config.data_dir or sources.default_data_dir()


# ----------------------------------------------------------------------------- images


def _load_image_split(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole split into memory as uint8 images [N, H, W, C] and int32 labels."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name
        raise sources.DatasetUnavailableError(
            f"config.dataset={name!r} is not a TFDS dataset ({e}). Use 'fashion_mnist', 'mnist' or "
            "another TFDS name, or 'tiny_shakespeare' / a .txt path with config.task='lm'."
        ) from e
    if not builder.is_prepared():
        if name == "fashion_mnist":
            sources.prepare_fashion_mnist(data_dir)
        else:
            try:
                builder.download_and_prepare()
            except Exception as e:
                raise sources.DatasetUnavailableError(
                    f"TFDS dataset {name!r} is not prepared in {data_dir} and could not be "
                    f"downloaded ({type(e).__name__}). Run with network once, or prepare it with "
                    f"`tfds build {name} --data_dir={data_dir}`."
                ) from e
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return data["image"], data["label"].astype(np.int32)


def _image_train_fn(config, images: np.ndarray, labels: np.ndarray):
    n = len(images)
    global_batch = config.batch_size
    pad, flip = int(config.augment.random_crop_pad), bool(config.augment.random_flip)
    if flip:
        # Every image and then its mirror image: one gather both picks and flips (example i
        # mirrored is row n + i), far cheaper than TF's reverse and select on uint8
        # (docs/performance.md, "Measurements behind the code").
        images = np.concatenate([images, images[:, :, ::-1]])
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    positions = _process_slice(global_batch)
    local = positions.shape[0]

    def make_stack(steps):
        # Global example number -> (epoch, position); each epoch is a fresh permutation.
        g = tf.reshape(steps[:, None] * global_batch + positions[None, :], [-1])
        epoch, pos = g // n, g % n
        seeds = tf.stack([tf.fill(tf.shape(g), tf.cast(config.seed, tf.int64)), epoch, 0 * g], 1)
        max_index = tf.fill(tf.shape(g), tf.constant(n - 1, tf.int64))
        # The raw op: the tf.random.experimental wrapper mis-pads batched [n, 3] seeds.
        idx = tf.raw_ops.RandomIndexShuffle(index=pos, seed=seeds, max_index=max_index)
        targets = tf.reshape(tf.gather(labels_t, idx), [-1, local])
        if flip:
            idx += n * tf.reshape(tf.cast(_flip_coins(config.seed, steps, local), tf.int64), [-1])
        # Raw uint8 pixels: the model scales them on the device (models/preprocessing.py).
        x = tf.reshape(tf.gather(images_t, idx), tf.concat([[-1, local], images.shape[1:]], 0))
        if pad:
            x = tf.map_fn(
                lambda a: _random_crops(a[0], config.seed, a[1], pad),
                (x, steps),
                fn_output_signature=x.dtype,
            )
        return {"inputs": x, "targets": targets}

    return functools.partial(_step_batches, make_stack)


def _augment_key(seed: int, step: tf.Tensor) -> tf.Tensor:
    return tf.stack([tf.cast(seed, tf.int64) + 1_000_003, step])


def _flip_coins(seed: int, steps: tf.Tensor, batch: int) -> tf.Tensor:
    """[steps, batch] booleans: which examples of each step's batch to mirror, seeded by
    (seed, step)."""

    def coins(step):
        return tf.random.stateless_uniform([batch], seed=_augment_key(seed, step)) < 0.5

    return tf.map_fn(coins, steps, fn_output_signature=tf.bool)


def _random_crops(x: tf.Tensor, seed: int, step: tf.Tensor, pad: int) -> tf.Tensor:
    """Random crops (after zero padding by `pad` pixels) of one step's batch, seeded by
    (seed, step)."""
    b, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [b, 2], seed=_augment_key(seed, step) + 1, maxval=2 * pad + 1, dtype=tf.int32
    )
    return tf.map_fn(
        lambda a: tf.slice(a[0], [a[1][0], a[1][1], 0], [h, w, -1]),
        (x, offsets),
        fn_output_signature=x.dtype,
    )


def _padded_eval_fn(config, num_examples: int, gather):
    """Iterates every example exactly once: the last global batch is padded and masked."""
    global_batch = config.eval_batch_size
    positions = _process_slice(global_batch)
    num_batches = -(-num_examples // global_batch)

    def make_batch(b):
        g = b * global_batch + positions
        mask = g < num_examples
        batch = gather(tf.minimum(g, num_examples - 1))
        batch["mask"] = tf.cast(mask, tf.float32)
        return batch

    ds = tf.data.Dataset.range(num_batches).map(make_batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def image_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Train and test pipelines of the TFDS image dataset `config.dataset`."""
    data_dir = _data_dir(config)
    train_x, train_y = _load_image_split(config.dataset, "train", data_dir)
    test_x, test_y = _load_image_split(config.dataset, "test", data_dir)
    test_x_t, test_y_t = tf.constant(test_x), tf.constant(test_y)

    def gather_test(idx):
        return {"inputs": tf.gather(test_x_t, idx), "targets": tf.gather(test_y_t, idx)}

    eval_ds = _padded_eval_fn(config, len(test_x), gather_test)

    def eval_batches(split: str = "test") -> Iterator[Batch]:
        """Every example of 'test' (or 'train', un-augmented, for evaluate.py) exactly once."""
        if split == "test":
            return eval_ds.as_numpy_iterator()
        if split == "train":  # built on demand: training itself never evaluates this split
            train_x_t, train_y_t = tf.constant(train_x), tf.constant(train_y)

            def gather_train(idx):
                return {"inputs": tf.gather(train_x_t, idx), "targets": tf.gather(train_y_t, idx)}

            return _padded_eval_fn(config, len(train_x), gather_train).as_numpy_iterator()
        raise ValueError(f"{config.dataset} has the splits 'train' and 'test', not {split!r}.")

    return Datasets(
        train_batches=_image_train_fn(config, train_x, train_y),
        eval_batches=eval_batches,
        eval_splits=("test",),
        num_train_examples=len(train_x),
        example_input=np.zeros((1,) + train_x.shape[1:], train_x.dtype),
        num_classes=int(train_y.max()) + 1,
    )
