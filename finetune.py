"""Start a run from another run's checkpoint (`config.init_from`): pretraining -> fine-tuning.
The source may also be a Hugging Face GPT-2 directory: it is imported here, when the run starts
(configs only name it), once (hf/importing.py) into a cached workdir, and used from there.

The source is restored with `experiment.restore_run`, the same verified path that resuming and
every inference command use (a damaged checkpoint is skipped or refused exactly as on resume).
Every parameter of the model starts from the source's, or the run is refused: parameters are
matched by path, after the conversions that lose nothing:

- the blocks' layout: a source trained with `model.scan_layers=True` (blocks stacked in `h`)
  into an unscanned model (`h_0` ... `h_{L-1}`), and back (`models.gpt.unstack_layers`,
  `stack_layers`); the optimizer state too, for mode='state';
- the embedding's padding rows (`model.vocab_pad_multiple`): with the same tokenizer, the rows
  of the real vocabulary are copied and padding rows, which are never scored or sampled, keep
  their fresh values;
- a tied output layer into an untied one (`lm_head/kernel` = the embedding transposed), and an
  untied one whose kernel equals the embedding into a tied model;
- another float dtype when every value survives the cast.

Whatever still does not fit (another shape, a parameter the source lacks or has in excess, rows
of another tokenizer) is refused with one line naming the paths, unless
`config.init_from.reinit` names it: path patterns whose parameters start afresh (a new
classifier head, a resized vocabulary) and whose source parameters are left out. Nothing is
re-initialised that the user did not name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

import config_validation
import experiment
import train_state
from hf import importing
from runtime import distributed

_BLOCK = re.compile(r"h_(\d+)")  # an unrolled GPT block's top-level name
_SHOWN = 10  # entries of a path list shown in one error line


class InitFromError(config_validation.ConfigError):
    """The source's parameters do not fit the model and `config.init_from.reinit` does not name
    them (one line naming the paths and the fix)."""


def reinit_patterns(items: Any) -> tuple[str, ...]:
    """`config.init_from.reinit` as path patterns, in any form typed on a command line (as
    `freeze` accepts): ('head', 'wte'), 'head,wte', '(head, wte)', "['h_1*/', 'lm_head']"."""
    items = (items,) if isinstance(items, str) else tuple(items or ())
    patterns = []
    for item in items:
        for part in str(item).strip("()[] ").split(","):
            part = part.strip().strip("'\"").strip().rstrip("/")
            if part:
                patterns.append(part)
    return tuple(patterns)


def matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether parameter `path` ('h_0/attn/query/kernel') is named by a pattern: the path or one
    of its leading whole segments ('h_0', 'h_0/attn') equals the pattern, or matches it as a
    shell glob ('h_*', '*/bias'). 'h_1' does not name 'h_10'."""
    return any(
        fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + "/*") for p in patterns
    )


@dataclasses.dataclass
class Transfer:
    """What `transfer_params` made of the source: the merged parameters and the account."""

    params: Any  # the model's parameter tree, every leaf a host numpy array
    copied: list[str]  # model paths holding the source's values
    reinit: list[str]  # model paths left fresh because config.init_from.reinit names them
    dropped: list[str]  # source paths config.init_from.reinit leaves out
    converted: list[str]  # notes: conversions made on the way (padding rows, dtype, tying)
    problems: list[tuple[str, str]]  # (model path, why it cannot be copied)
    extra: list[str]  # source paths the model has no place for
    verbatim: bool  # every copied array kept its shape and dtype (what mode='state' needs)


def transfer_params(
    fresh: Any,
    source: Any,
    patterns: Sequence[str] = (),
    *,
    vocab_axes: Mapping[str, int] | None = None,
    vocab_size: int | None = None,
    vocab_refusal: str = "",
) -> Transfer:
    """Copies `source` params into the model's `fresh` ones (both trees of arrays, the source
    already in the model's block layout), path by path. A path named by `patterns` keeps its
    fresh value; otherwise the source's array is copied when it has the same shape, or differs
    only in padding rows along the 'vocab' axis (`vocab_axes`: path -> axis index; both at
    least `vocab_size` long: those first rows are copied), cast to the fresh dtype when no value
    changes. `vocab_refusal` (a reason) marks every 'vocab' parameter as not copyable (the
    rows would mean other tokens). Refuses nothing itself: the Transfer lists the problems."""
    vocab_axes = vocab_axes or {}
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged: dict[str, Any] = {}
    copied, reinit, converted, problems = [], [], [], []
    verbatim = True
    for path, value in flat_fresh.items():
        merged[path] = value
        if matches(path, patterns):
            reinit.append(path)
            continue
        other = flat_source.get(path)
        if other is None:
            problems.append((path, "the source has no such parameter"))
            continue
        if vocab_refusal and path in vocab_axes:
            problems.append((path, vocab_refusal))
            continue
        array, note, problem = _fit(np.asarray(other), np.asarray(value), vocab_axes.get(path),
                                    vocab_size)  # fmt: skip
        if problem:
            problems.append((path, problem))
            continue
        if note:
            converted.append(f"{path}: {note}")
            verbatim = False
        merged[path] = array
        copied.append(path)
    dropped, extra = [], []
    for path in flat_source:
        if path not in flat_fresh:
            (dropped if matches(path, patterns) else extra).append(path)
    return Transfer(
        params=traverse_util.unflatten_dict(merged, sep="/"),
        copied=copied,
        reinit=reinit,
        dropped=dropped,
        converted=converted,
        problems=problems,
        extra=extra,
        verbatim=verbatim,
    )


def _fit(
    other: np.ndarray, value: np.ndarray, vocab_axis: int | None, vocab_size: int | None
) -> tuple[np.ndarray | None, str, str]:
    """(the source's array made to the model's shape and dtype, a note on what was converted,
    '') or (None, '', why it cannot be)."""
    note = ""
    if other.shape != value.shape:
        same_elsewhere = (
            vocab_axis is not None
            and other.ndim == value.ndim
            and all(a == b for i, (a, b) in enumerate(zip(other.shape, value.shape, strict=True))
                    if i != vocab_axis)
        )  # fmt: skip
        if not (
            same_elsewhere
            and vocab_size is not None
            and min(other.shape[vocab_axis], value.shape[vocab_axis]) >= vocab_size
        ):
            return None, "", f"shape {other.shape} in the source, {value.shape} in the model"
        rows = [slice(None)] * value.ndim
        rows[vocab_axis] = slice(0, vocab_size)
        padded = np.array(value)  # the model's padding rows keep their fresh (unused) values
        padded[tuple(rows)] = other[tuple(rows)].astype(value.dtype)
        note = (f"the {vocab_size} token rows of {other.shape[vocab_axis]} (the rest is "
                f"padding, never scored) into {value.shape[vocab_axis]}")  # fmt: skip
        other = padded
    if other.dtype != value.dtype:
        cast = other.astype(value.dtype)
        if not np.array_equal(cast.astype(other.dtype), other, equal_nan=True):
            return None, "", (f"{other.dtype} in the source, {value.dtype} in the model: the "
                              "cast would change values")  # fmt: skip
        note = note or f"{other.dtype} -> {value.dtype}, every value kept"
        other = cast
    return other, note, ""


def _first_dense(model: Any) -> int:
    """How many leading blocks an MoE GPT keeps dense (stacked apart, in `h_dense`, when
    scanned); 0 for a dense model or another model."""
    return int(getattr(model, "moe_first_dense", 0)) if getattr(model, "moe_num_experts", 0) else 0


def _block_count(params: Mapping[str, Any]) -> int:
    return sum(1 for k in params if _BLOCK.fullmatch(k))


def _on_host(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with new arrays made on the host's CPU device, as numpy arrays (stacking a
    large model's blocks must not fill an accelerator)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU platform in this process (JAX_PLATFORMS excludes it)
        return jax.tree.map(np.asarray, fn(*args))
    with jax.default_device(cpu):
        return jax.tree.map(np.asarray, fn(*args))


def to_layout(
    params: Any, source_scanned: bool, target_scanned: bool, first_dense: int = 0
) -> tuple[Any, str]:
    """GPT `params` (a dict of numpy arrays) in the block layout of the model: stacked in `h`
    (scan_layers; an MoE model's first `first_dense` dense blocks in `h_dense`) or unrolled in
    h_0 ... h_{L-1}, converted with models.gpt's stack_layers / unstack_layers (every value
    kept). Returns (params, a note: '' when nothing changed)."""
    from models import gpt

    if source_scanned == target_scanned or not isinstance(params, Mapping):
        return params, ""
    if source_scanned and ("h" in params or "h_dense" in params):
        params = _on_host(gpt.unstack_layers, dict(params))
        return params, (f"the source's stacked blocks (scan_layers=True) unstacked into "
                        f"h_0 ... h_{_block_count(params) - 1}")  # fmt: skip
    count = _block_count(params)
    if target_scanned and count:
        params = _on_host(gpt.stack_layers, dict(params), count, first_dense)
        into = f"h_dense (the first {first_dense}) and h" if first_dense else "h"
        return (
            params,
            f"the source's blocks h_0 ... h_{count - 1} stacked into {into} (scan_layers=True)",
        )
    return params, ""


def _relayout_tree(tree: Any, keys: frozenset[str], convert: Callable[[Any], Any]) -> Any:
    """`convert` applied to every dict in `tree` (an optimizer state) whose keys are `keys`, the
    top level of the parameters (Adam's moments and the like mirror the parameters)."""
    is_params = lambda x: isinstance(x, Mapping) and frozenset(x) == keys  # noqa: E731
    return jax.tree.map(lambda x: convert(x) if is_params(x) else x, tree, is_leaf=is_params)


def _summary(paths: Sequence[str], everything: Sequence[str]) -> str:
    """Paths for one line: a top-level name whose every array is listed reads 'h_3/*'; runs of
    numbered blocks read 'h_2/* ... h_23/*'; at most _SHOWN entries."""
    listed = set(paths)
    groups: dict[str, list[str]] = {}
    for path in everything:
        groups.setdefault(path.split("/")[0], []).append(path)
    items: list[str] = []
    done: set[str] = set()
    for path in paths:
        top = path.split("/")[0]
        if top in done:
            continue
        members = groups.get(top, [path])
        if len(members) > 1 and all(m in listed for m in members):
            items.append(f"{top}/*")
            done.add(top)
        else:
            items.append(path)
    collapsed: list[str] = []
    for item in items:  # h_2/*, h_3/*, ..., h_23/* -> h_2/* ... h_23/*
        block = re.fullmatch(r"h_(\d+)/\*", item)
        last = collapsed[-1] if collapsed else ""
        previous = re.fullmatch(r"(h_\d+/\* \.\.\. )?h_(\d+)/\*", last)
        if block and previous and int(block.group(1)) == int(previous.group(2)) + 1:
            start = last.split(" ... ")[0]
            collapsed[-1] = f"{start} ... {item}"
        else:
            collapsed.append(item)
    more = len(collapsed) - _SHOWN
    shown = ", ".join(collapsed[:_SHOWN])
    return shown + (f", and {more} more" if more > 0 else "")


def mismatch_message(source_name: str, transfer: Transfer, model_paths: Sequence[str],
                     source_paths: Sequence[str]) -> str:  # fmt: skip
    """The one-line refusal naming what cannot be copied and the fix."""
    by_reason: dict[str, list[str]] = {}
    for path, why in transfer.problems:
        by_reason.setdefault(why, []).append(path)
    parts = [f"{why}: {_summary(paths, model_paths)}" for why, paths in by_reason.items()]
    if len(parts) > _SHOWN:  # e.g. every array of another width: the first few say enough
        parts = parts[:_SHOWN] + [f"and {len(parts) - _SHOWN} more"]
    if transfer.extra:
        parts.append(
            f"the model has no place for the source's {_summary(transfer.extra, source_paths)}"
        )
    total = len(transfer.problems)
    return (
        f"config.init_from: {source_name} does not fit this model: {total} of its "
        f"{len(model_paths)} parameter arrays cannot start from the source's"
        f"{f' and {len(transfer.extra)} of the source are left over' if transfer.extra else ''}"
        f" ({'; '.join(parts)}). Make the model's fields match the source's config.json, or "
        "name what is to start afresh (and the source's parameters to leave out) in "
        "config.init_from.reinit, e.g. --config.init_from.reinit=\"('head',)\"."
    )


def init_from(run: experiment.Run, state: train_state.TrainState) -> train_state.TrainState:
    """Returns `state` with parameters (and, for mode='state', optimizer state and step) taken
    from `run.config.init_from.workdir`'s checkpoint, placed with `run.abstract_state`'s
    shardings: every parameter the source's (converted as the module docstring says) except
    those `init_from.reinit` names.

    Raises FileNotFoundError (no such run or step), checkpointing.CheckpointMismatchError (its
    checkpoints are damaged), InitFromError (a config_validation.ConfigError: parameters that
    do not fit and are not named in init_from.reinit, or a reinit pattern that names nothing),
    config_validation.ConfigError (mode='state' with parameters or an optimizer state that are
    not the source's) and hf.gpt2_files.HFConvertError (a Hugging Face directory that does not
    import).
    """
    spec = run.config.init_from
    patterns = reinit_patterns(spec.get("reinit", ()))
    devices = list(run.mesh.devices.flat)
    # A Hugging Face GPT-2 directory is imported now (the config only names it), once, into a
    # cached workdir that later runs reuse (hf/importing.py); a jaxlab workdir is used as is.
    source_workdir = importing.imported_workdir(spec.workdir)
    source = experiment.restore_run(source_workdir, spec.step, devices=devices)
    source_state = distributed.to_host(source.state)
    fresh = distributed.to_host(state)
    source_name = f"{source_workdir} (step {source.step})"

    source_scanned = bool(getattr(source.model, "scan_layers", False))
    target_scanned = bool(getattr(run.model, "scan_layers", False))
    first_dense = _first_dense(run.model)
    source_params, layout_note = to_layout(
        source_state.params, source_scanned, target_scanned, first_dense
    )
    notes = [layout_note] if layout_note else []
    axes = train_state.param_logical_axes(run.model, run.input_spec.example_input)
    vocab_axes = {path: names.index("vocab") for path, names in axes.items() if "vocab" in names}
    source_params, tie_note = _retie(source_params, source.model, run.model)
    notes += [tie_note] if tie_note else []
    # Rows of vocabulary-indexed parameters (embeddings, output layers) mean tokens: with
    # another tokenizer they would mean other tokens, so they are not copied.
    vocab_refusal = ""
    if None not in (run.tokenizer, source.tokenizer) and run.tokenizer != source.tokenizer:
        vocab_refusal = (f"the source's {source.tokenizer.describe()} differs from this run's "
                         f"{run.tokenizer.describe()}, so its vocabulary rows would mean other "
                         "tokens")  # fmt: skip
    vocab_size = getattr(run.model, "vocab_size", None)
    if getattr(source.model, "vocab_size", None) != vocab_size:
        vocab_size = None  # no padding conversion between vocabularies of other sizes
    transfer = transfer_params(fresh.params, source_params, patterns, vocab_axes=vocab_axes,
                               vocab_size=vocab_size, vocab_refusal=vocab_refusal)  # fmt: skip
    model_paths = list(traverse_util.flatten_dict(fresh.params, sep="/"))
    source_paths = list(traverse_util.flatten_dict(source_params, sep="/"))
    _check_patterns(patterns, model_paths + source_paths, fresh.model_state)
    state_mode = spec.mode == "state"
    if state_mode and (transfer.problems or transfer.extra or transfer.reinit or transfer.dropped
                       or not transfer.verbatim or tie_note):  # fmt: skip
        differ = [p for p, _ in transfer.problems] + transfer.extra + transfer.reinit
        raise config_validation.ConfigError(
            "config.init_from.mode='state' needs the source's parameters as they are (the "
            f"optimizer state is theirs); these differ or start afresh: {differ[:_SHOWN]}"
            f"{' and padding or tying conversions' if not differ else ''}. Use mode='params'."
        )
    if transfer.problems or transfer.extra:
        raise InitFromError(mismatch_message(source_name, transfer, model_paths, source_paths))
    notes += transfer.converted
    new = fresh.replace(params=transfer.params)
    if state_mode:
        new = new.replace(opt_state=_source_opt_state(source_state, fresh, source_scanned,
                                                      target_scanned, first_dense),
                          step=np.asarray(source_state.step))  # fmt: skip
    if source_state.model_state or fresh.model_state:
        source_model_state, _ = to_layout(source_state.model_state, source_scanned,
                                          target_scanned, first_dense)  # fmt: skip
        merged = transfer_params(fresh.model_state, source_model_state, patterns)
        if merged.problems or merged.extra:
            raise InitFromError(mismatch_message(
                source_name, merged, list(traverse_util.flatten_dict(fresh.model_state, sep="/")),
                list(traverse_util.flatten_dict(source_model_state, sep="/"))
            ).replace("parameter arrays", "model-state arrays"))  # fmt: skip
        new = new.replace(model_state=merged.params)
    if jax.process_index() == 0:
        asked = " (named by config.init_from.reinit)" if transfer.reinit else ""
        print(
            f"init_from {source_name}: copied {len(transfer.copied)} parameter arrays; "
            f"re-initialised {len(transfer.reinit)}: {transfer.reinit}{asked}",
            flush=True,
        )
        if transfer.dropped:
            print(f"init_from: left out the source's {transfer.dropped} (named by "
                  "config.init_from.reinit)", flush=True)  # fmt: skip
        for note in notes:
            print(f"init_from: converted {note}", flush=True)
    logging.info("Re-initialised parameters (config.init_from.reinit): %s", transfer.reinit)
    shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state)
    return jax.device_put(new, shardings)


def _retie(params: Any, source_model: Any, model: Any) -> tuple[Any, str]:
    """A tied source's embedding as the untied model's lm_head/kernel [embed, vocab rows] (the
    same function), and an untied source's lm_head dropped for a tied model when it equals the
    embedding. Anything else is left for transfer_params to refuse. Returns (params, note)."""
    if not isinstance(params, Mapping) or "wte" not in params:
        return params, ""
    source_tied = getattr(source_model, "tie_embeddings", None)
    tied = getattr(model, "tie_embeddings", None)
    embedding = np.asarray(params["wte"]["embedding"])
    if source_tied and tied is False and "lm_head" not in params:
        return {**params, "lm_head": {"kernel": embedding.T.copy()}}, (
            "lm_head/kernel: the source's tied output layer (its embedding, transposed)"
        )
    if source_tied is False and tied and "lm_head" in params:
        kernel = np.asarray(params["lm_head"]["kernel"])
        if kernel.shape == embedding.T.shape and np.array_equal(kernel, embedding.T):
            rest = {k: v for k, v in params.items() if k != "lm_head"}
            return rest, "the source's lm_head/kernel, equal to its embedding, into the tied output"
    return params, ""


def _check_patterns(patterns: Sequence[str], paths: Sequence[str], model_state: Any) -> None:
    """Raises config_validation.ConfigError naming every reinit pattern that names nothing (a
    typo would otherwise re-initialise nothing and then refuse with a confusing list)."""
    everything = list(paths) + list(traverse_util.flatten_dict(model_state or {}, sep="/"))
    unmatched = [p for p in patterns if not any(matches(q, (p,)) for q in everything)]
    if unmatched:
        tops = sorted({q.split("/")[0] for q in everything})
        raise config_validation.ConfigError(
            f"config.init_from.reinit: {unmatched} name no parameter of the model or the source. "
            f"Patterns are parameter paths, their leading segments or shell globs ('h_*'); the "
            f"top level: {tops}."
        )


def _source_opt_state(source_state: Any, fresh: Any, source_scanned: bool,
                      target_scanned: bool, first_dense: int) -> Any:  # fmt: skip
    """The source's optimizer state in the model's block layout, checked to be the fresh
    state's structure and shapes (another optimizer or freeze setting is refused)."""
    opt_state = source_state.opt_state
    if source_scanned != target_scanned:
        keys = frozenset(source_state.params)
        opt_state = _relayout_tree(
            opt_state,
            keys,
            lambda p: to_layout(p, source_scanned, target_scanned, first_dense)[0],
        )
    ours = jax.tree_util.tree_flatten_with_path(fresh.opt_state)[0]
    theirs = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    same = jax.tree.structure(opt_state) == jax.tree.structure(fresh.opt_state) and all(
        np.shape(a) == np.shape(b) for (_, a), (_, b) in zip(ours, theirs, strict=True)
    )
    if not same:
        mine = {jax.tree_util.keystr(k): np.shape(v) for k, v in ours}
        other = {jax.tree_util.keystr(k): np.shape(v) for k, v in theirs}
        differ = sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
        raise config_validation.ConfigError(
            "config.init_from.mode='state': the source's optimizer state is not this run's "
            f"(another optimizer, or other freeze prefixes): {differ[:5]} differ. Use "
            "mode='params', or the source's optimizer settings."
        )
    return jax.tree.map(lambda a, b: np.asarray(b, dtype=np.asarray(a).dtype), fresh.opt_state,
                        opt_state)  # fmt: skip
