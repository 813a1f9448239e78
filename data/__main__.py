"""`python -m data [--data_dir=...]` (`make data`): prepares every dataset jaxlab's configs name,
offline where the files are installed, and prints one status line each.

Fashion-MNIST and Tiny Shakespeare become TFDS datasets; the KJV text is optional (Debian's
`bible-kjv-text`); the text corpora are then tokenized once with the char and byte tokenizers,
as training on them would. The exit status is 1 if a required dataset is unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from data import prepare, sources
from runtime import cli


def main(argv: Sequence[str]) -> int:
    """Prepares every dataset without TFDS's progress bars (they clutter `make data`'s log)."""
    del argv  # cli.run rejects positional arguments
    tfds = sources.import_tfds()
    tfds.disable_progress_bar()
    return prepare.prepare_all(flags.FLAGS.data_dir)


if __name__ == "__main__":
    flags.DEFINE_string(
        "data_dir",
        None,
        "TFDS data dir (default: $JAXLAB_DATA_DIR, else <repo>/.data/tensorflow_datasets).",
    )
    cli.run(main)
