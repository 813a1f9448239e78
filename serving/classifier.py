"""Image classification for the server: the run's own compiled predict step (the one evaluate.py
uses) on a fixed batch, so one compilation serves every request."""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from typing import Any

import numpy as np

from runtime import distributed


class ImageError(ValueError):
    """An image that is not one the model takes; `field` names it (e.g. 'images[2]')."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Classifier:
    """A restored classifier run (experiment.Restored) behind a lock, `batch_size` images per
    compiled call (rounded up to a multiple of the mesh's devices; requests are padded)."""

    def __init__(self, restored: Any, batch_size: int) -> None:
        self.restored = restored
        self.run = restored.run
        example = self.run.input_spec.example_input  # uint8 [1, H, W, C]: raw pixels
        self.image_shape = tuple(int(d) for d in example.shape[1:])
        self.dtype = example.dtype
        self.num_classes = int(self.run.input_spec.num_classes)
        devices = self.run.mesh.size
        self.batch_size = -(-max(1, batch_size) // devices) * devices
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Compiles (and runs once) the predict step on a zero batch; returns the seconds."""
        start = time.perf_counter()
        self.predict(np.zeros((1,) + self.image_shape, self.dtype))
        return time.perf_counter() - start

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float64 class probabilities [N, classes] of raw-pixel images [N, H, W, C] (the
        dtype the run was trained on, uint8 for images), batch by batch."""
        out = []
        compiled = self.run.compiled
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size,) + self.image_shape, self.dtype)
            padded[: len(chunk)] = chunk
            with self._lock, compiled.context():
                placed = compiled.put_batch({"inputs": padded})
                log_probs = distributed.to_host(compiled.predict_step(self.restored.state, placed))
            out.append(np.exp(np.asarray(log_probs, np.float64))[: len(chunk)])
        return np.concatenate(out)

    def decode_image(self, field: str, image: Any) -> np.ndarray:
        """One request image -> raw pixels of the model's input shape and dtype.

        `image` is a nested list of integer pixel values in [0, 255] shaped [H, W, C] (or
        [H, W] when C is 1), or a base64 string of a PNG of the model's size (converted to
        grayscale or RGB as the model's channels say). Raises ImageError naming `field`."""
        height, width, channels = self.image_shape
        if isinstance(image, str):
            pixels = self._decode_png(field, image)
        else:
            try:
                pixels = np.array(image, dtype=np.float64)
            except (ValueError, TypeError):
                raise ImageError(field, "not a rectangular array of numbers") from None
        if pixels.ndim == 2 and channels == 1:
            pixels = pixels[..., None]
        if pixels.shape != self.image_shape:
            raise ImageError(
                field,
                f"shape {list(pixels.shape)}, but the model takes [{height}, {width}, {channels}]"
                + (f" (or [{height}, {width}])" if channels == 1 else "")
                + " raw pixels",
            )
        if not np.all(np.isfinite(pixels)) or pixels.min() < 0 or pixels.max() > 255:
            raise ImageError(field, "pixel values must be in [0, 255] (raw pixels, not scaled)")
        if np.any(pixels != np.round(pixels)):
            raise ImageError(field, "pixel values must be integers in [0, 255] (raw pixels)")
        return pixels.astype(self.dtype)

    def _decode_png(self, field: str, text: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(field, "a string image must be base64 (of a PNG)") from None
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "PNG":
                    raise ImageError(field, f"a {img.format} image; send a PNG")
                mode = "L" if self.image_shape[2] == 1 else "RGB"
                return np.asarray(img.convert(mode), np.float64)
        except (UnidentifiedImageError, OSError):
            raise ImageError(field, "the base64 data is not a readable PNG") from None
