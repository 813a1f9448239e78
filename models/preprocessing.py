"""Raw image pixels as the models see them: uint8 [0, 255] becomes floats in [0, 1] on device."""

from __future__ import annotations

import jax.numpy as jnp


def pixels_to_unit_range(x: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    """uint8 pixels [0, 255] -> `dtype` in [0, 1]; float inputs are taken as already scaled.

    The input pipeline ships raw uint8 images (a quarter of float32's bytes to gather, stack and
    copy on the host, which shares its cores with the step on CPU) and the model scales them
    first thing, as a Keras Rescaling(1/255) layer would, so exported models take raw pixels.
    """
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0  # in float32, then one rounding to a narrower dtype
    return x.astype(dtype)
