"""What every command shares: absl's entry point, one-line errors and quiet TensorFlow logging.

Each command (train.py, sample.py, evaluate.py, python -m data, python -m tools.<name>) defines its
flags under `if __name__ == "__main__":` and ends with `cli.run(main)`. An error in what the user
asked for (a `UserError`, or a file that is not there) is printed as one `ERROR: ...` line with
exit status 1; anything else is a bug and keeps its traceback. This module imports nothing heavy:
the sweep tool uses it without loading JAX.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging


class UserError(Exception):
    """Something the user asked for cannot be done; the message names the field and the fix.

    Commands print it as one `ERROR:` line and exit with status 1 (no traceback)."""


def quiet_tensorflow() -> None:
    """Silences TensorFlow's C++ start-up logging; call before the first `import tensorflow`.

    Set, not defaulted: importing jax already sets the variable to 1."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"


def tpu_attached() -> bool:
    """Whether this host has TPU chips: the device files a TPU VM exposes (/dev/accel0, ... on
    v4 and v5p, /dev/vfio/0, ... on v5e and later; /dev/vfio alone is any IOMMU host's). The one
    answer every command uses, read before JAX starts."""
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_without_tpu() -> None:
    """On a machine with libtpu installed (the dev extra brings it, for tools/aot.py) but no TPU
    attached, JAX's TPU plugin warns at start-up that it cannot find one and may look for a
    metadata server; these defaults make it fall back to the other backends silently and never
    query the network. On a TPU VM (chips under /dev/accel* or /dev/vfio) nothing is set."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or tpu_attached():
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt --config.<field> reported in one readable line
    (ml_collections raises a bare AttributeError from deep inside the parser)."""
    kept, nones = _none_overrides(argv)
    given = sys.argv
    # ml_collections also reads a config flag's overrides from sys.argv itself.
    sys.argv = [a for a in sys.argv if a in kept or a not in argv]
    try:
        remaining = app.parse_flags_with_usage(kept)
        for flag, path in nones:
            _set_none(flag, path)
        return remaining
    except UserError as e:  # a config file's get_config refusing its argument
        raise SystemExit(f"ERROR: {e}") from None
    except (AttributeError, KeyError) as e:
        inner = e
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else str(inner)
        field, _, hint = text.partition("\n")
        field = field.strip("'\"")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and field in a]
        raise SystemExit(
            f"ERROR: {bad[0] if bad else '--config'}: the config has no field {field!r}. "
            f"{hint} Every field is defined in configs/base.py (model fields in models/)."
        ) from None
    finally:
        sys.argv = given


def _none_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Takes `--<config flag>.<field>=None` out of argv: ml_collections parses a typed field's
    text with its type (int('None') fails), so None, valid wherever a field's default is None,
    could not be given on the command line. Returns (the other arguments, [(flag, field)])."""
    kept, nones = [], []
    for arg in argv:
        name, eq, value = arg.removeprefix("--").partition("=")
        flag, dot, path = name.partition(".")  # only a config flag's overrides have a dot
        if arg.startswith("--") and eq and dot and flag in flags.FLAGS and value == "None":
            nones.append((flag, path))
        else:
            kept.append(arg)
    return kept, nones


def _set_none(flag: str, path: str) -> None:
    """Sets the config field `path` (dotted) of config flag `flag` to None, or raises a
    UserError naming the field when None is not one of its values."""
    *parents, field = path.split(".")
    node = flags.FLAGS[flag].value
    try:
        for parent in parents:
            node = node[parent]
        if field not in node:
            raise KeyError(field)
        node[field] = None
    except KeyError:
        raise UserError(f"--{flag}.{path}=None: the config has no field {path!r}.") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"--{flag}.{path}=None: this field cannot be None ({e}).") from None


def run(main: Callable[[Sequence[str]], object]) -> None:
    """absl's `app.run(main)` with the shared conventions: no positional arguments, WARNING
    logging unless --verbosity is given (Orbax and TFDS log every step at INFO), and known
    errors as one `ERROR:` line with exit status 1."""

    def wrapped(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            status = main(argv)
        except (UserError, FileNotFoundError) as e:
            raise SystemExit(f"ERROR: {e}") from e
        if isinstance(status, int) and status:
            raise SystemExit(status)

    quiet_libtpu_without_tpu()
    app.run(wrapped, flags_parser=parse_flags)
