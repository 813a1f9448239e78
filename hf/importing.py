"""A Hugging Face GPT-2 directory imported as a jaxlab workdir (config, tokenizer, a verified
step-0 checkpoint): by `python -m tools.hf_convert import`, or once per directory when a
fine-tuning run names one in `config.init_from.workdir` (finetune.py, at run time). A config
that names a directory reads only its config.json (`source_config`): it converts nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

import data
from hf.gpt2_files import (
    ACTIVATIONS,
    IMPORT_RECORD,
    GPT2Shape,
    HFConvertError,
    is_hugging_face_dir,
    read_hf_config,
    read_hf_tokenizer,
    read_hf_weights,
)
from hf.gpt2_layout import hf_to_jaxlab

if TYPE_CHECKING:
    import ml_collections


def jaxlab_config(
    shape: GPT2Shape,
    tokenizer_path: str,
    *,
    dtype: str = "float32",
    vocab_pad_multiple: int = 1,
    scan_layers: bool = False,
) -> ml_collections.ConfigDict:
    """A jaxlab run config (ml_collections.ConfigDict) for a GPT-2 of `shape`: the training
    settings of configs/gpt2_small.py, the tokenizer at `tokenizer_path` (a Hugging Face
    tokenizer.json), Tiny Shakespeare as the stand-in dataset (what evaluate.py reads; a
    fine-tuning run names its own), dropout off (nanoGPT's fine-tuning default)."""
    from configs import gpt2_small
    from configs.gpt_model import gpt_model

    config = gpt2_small.get_config()
    config.dataset = "tiny_shakespeare"
    config.tokenizer = tokenizer_path
    config.dtype = dtype
    model = {
        "vocab_size": shape.vocab_size,
        "block_size": shape.n_positions,
        "num_layers": shape.n_layer,
        "num_heads": shape.n_head,
        "embed_dim": shape.n_embd,
        "mlp_ratio": 4,
        "dropout_rate": 0.0,
        "use_bias": True,
        "position_embedding": "learned",
        "norm": "layernorm",
        "norm_epsilon": shape.layer_norm_epsilon,
        "mlp_activation": ACTIVATIONS[shape.activation_function],
        "tie_embeddings": True,
        "vocab_pad_multiple": vocab_pad_multiple,
        "remat_policy": "none",
        "scan_layers": scan_layers,
    }
    if shape.n_inner != 4 * shape.n_embd:
        model["mlp_hidden_dim"] = shape.n_inner
    # Every GPT field (configs/gpt_model.py), so that the run's config.json records each and
    # each stays settable from the command line when the run is fine-tuned.
    config.model = gpt_model(**model)
    return config


def source_config(hf_dir: str) -> ml_collections.ConfigDict:
    """The run config (ml_collections.ConfigDict) that importing `hf_dir` with the default
    options would write, from its config.json alone: no weight is read and nothing is written.
    Its tokenizer is the directory's own tokenizer.json (the import keeps it unchanged, so the
    fine-tuning run's tokenizer equals the imported model's and the embedding rows are copied).
    What configs/gpt2_finetune.py starts from when it names a Hugging Face directory. Its
    model.vocab_size is the tokenizer's (an embedding padded beyond it is cut as the import
    cuts it, see `model_shape`).

    Raises HFConvertError as `read_hf_config` and `read_hf_tokenizer` do (not a GPT-2, a
    variant jaxlab does not compute, a tokenizer larger than the embedding), and when the
    directory has no tokenizer.json (vocab.json + merges.txt cannot be named as a run's
    tokenizer: import the directory first, whose workdir holds one)."""
    from data import tokenization

    shape = read_hf_config(hf_dir)
    tokenizer_json = os.path.join(os.path.abspath(hf_dir), tokenization.TOKENIZER_JSON)
    if not os.path.isfile(tokenizer_json):
        raise HFConvertError(
            f"{hf_dir} has no {tokenization.TOKENIZER_JSON} for the run to tokenize its data "
            "with; import it first (python -m tools.hf_convert import "
            f"--hf_dir={hf_dir} --workdir=DIR) and start from that workdir."
        )
    return jaxlab_config(model_shape(shape, read_hf_tokenizer(hf_dir, shape)), tokenizer_json)


def model_shape(shape: GPT2Shape, tokenizer: Any) -> GPT2Shape:
    """The shape of the jaxlab model a checkpoint of `shape` (config.json's) imports as: its
    vocab_size is the tokenizer's number of tokens. A checkpoint whose embedding is padded
    beyond its tokenizer (nanoGPT: 50,304 rows for 50,257 tokens) is one model over the
    tokenizer's tokens: the rows past them are never a token's, never scored and never sampled,
    so the import keeps `padded_vocab_size(tokens, vocab_pad_multiple)` of them (the default 1
    cuts them off; --vocab_pad_multiple=64 keeps nanoGPT's 50,304 bit for bit), as a jaxlab run
    pads, and export writes the tokenizer's size."""
    return dataclasses.replace(shape, vocab_size=int(tokenizer.vocab_size))


def _source_stamps(hf_dir: str) -> list[list]:
    """[name, size, mtime_ns] of the files an import reads: a changed source is re-imported."""
    names = sorted(
        n for n in os.listdir(hf_dir)
        if n.endswith((".json", ".safetensors", ".txt")) and os.path.isfile(os.path.join(hf_dir, n))
    )  # fmt: skip
    stats = {n: os.stat(os.path.join(hf_dir, n)) for n in names}
    return [[n, stats[n].st_size, stats[n].st_mtime_ns] for n in names]


def import_hf(
    hf_dir: str,
    workdir: str,
    *,
    vocab_pad_multiple: int = 1,
    scan_layers: bool = False,
    dtype: str = "float32",
) -> str:
    """Writes the Hugging Face GPT-2 in `hf_dir` as a jaxlab workdir (config.json,
    input_spec.json, tokenizer files, a verified checkpoint at step 0, hf_import.json); returns
    the workdir's absolute path.

    The parameters are float32 (as every jaxlab run keeps them); `dtype` is the compute dtype
    written to the config. The model's vocabulary is the tokenizer's; `vocab_pad_multiple` sets
    the embedding's rows to padded_vocab_size(tokens, vocab_pad_multiple) (e.g. 64: 50,257 ->
    50,304), the file's rows as far as they go and zeros after them, never scored
    (`model_shape`: a file padded beyond its tokenizer is cut or kept so). `scan_layers`
    stores the blocks stacked for `nn.scan`. Raises HFConvertError (missing files, not a
    GPT-2, shapes disagreeing with config.json, a tokenizer larger than the embedding) and
    workdir_files.WorkdirError (the workdir already holds a run, or a live run holds it).
    """
    import jax

    import checkpointing
    import experiment
    from data import tokenization
    from models import gpt
    from runtime import workdir_files

    file_shape = read_hf_config(hf_dir)
    tokenizer = read_hf_tokenizer(hf_dir, file_shape)
    weights = read_hf_weights(hf_dir, file_shape)
    shape = model_shape(file_shape, tokenizer)
    vocab_rows = gpt.padded_vocab_size(shape.vocab_size, vocab_pad_multiple)
    if file_shape.vocab_size != shape.vocab_size:
        print(f"{hf_dir}: the embedding has {file_shape.vocab_size} rows for the tokenizer's "
              f"{shape.vocab_size} tokens: rows {shape.vocab_size}.. are padding, never scored "
              f"or sampled; the import keeps {vocab_rows} rows (--vocab_pad_multiple="
              f"{vocab_pad_multiple}).", flush=True)  # fmt: skip
    params = hf_to_jaxlab(weights, shape, vocab_rows)
    del weights
    if scan_layers:
        params = jax.tree.map(np.asarray, gpt.stack_layers(params, shape.n_layer))

    workdir = os.path.abspath(workdir)
    checkpointing.check_path(workdir)
    with workdir_files.claim(workdir):
        checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
        try:
            if checkpointer.all_steps():
                raise workdir_files.WorkdirError(
                    f"{workdir} already holds a run (checkpoints {checkpointer.all_steps()}); "
                    "import into a new --workdir."
                )
            config = jaxlab_config(
                shape,
                os.path.join(workdir, tokenization.BPE_MODEL),
                dtype=dtype,
                vocab_pad_multiple=vocab_pad_multiple,
                scan_layers=scan_layers,
            )
            spec = data.InputSpec(np.zeros((1, shape.n_positions), np.int32))
            run = experiment.build_run(config, input_spec=spec, tokenizer=tokenizer,
                                       training=False)  # fmt: skip
            _check_same_tree(params, run.abstract_state.params)
            state = _initial_state(run, params)
            del params
            checkpointer.save(0, state, {"step": 0}, force=True)
        finally:
            checkpointer.close()
        workdir_files.save_run_records(workdir, run.config, spec, tokenizer)
        record = {
            "hf_dir": os.path.abspath(hf_dir),
            "source_files": _source_stamps(hf_dir),
            "imported": time.strftime("%Y-%m-%d %H:%M:%S"),
            "vocab_pad_multiple": vocab_pad_multiple,
            "scan_layers": scan_layers,
            "source_embedding_rows": file_shape.vocab_size,  # > the tokenizer's: padding
        }
        with open(os.path.join(workdir, IMPORT_RECORD), "w") as f:
            json.dump(record, f, indent=1)
    return workdir


def _check_same_tree(params: Any, abstract: Any) -> None:
    """The converted params have exactly the paths and shapes of the model's (a model whose
    parameter names changed would otherwise fail deep inside Orbax)."""
    from flax import traverse_util

    got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    if got != want:
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise RuntimeError(
            f"GPT-2 weights converted to parameters jaxlab's GPT does not have: {differ[:5]} "
            f"(converted {[got.get(k) for k in differ[:5]]}, "
            f"model {[want.get(k) for k in differ[:5]]})."
        )


def _initial_state(run: Any, params: Any) -> Any:
    """The train state at step 0 holding `params` (host numpy), with the optimizer's fresh
    state, created directly with the run's shardings."""
    import jax
    import jax.numpy as jnp

    import train_state

    shardings = jax.tree.map(lambda a: a.sharding, run.abstract_state)

    def make(p: Any) -> train_state.TrainState:
        return train_state.TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=run.tx.init(p), model_state={}
        )

    return jax.jit(make, out_shardings=shardings)(params)


def hf_import_cache_dir() -> str:
    """Where `imported_workdir` keeps imports: $JAXLAB_HF_CACHE, else <data root>/hf_imports
    (beside .data/tensorflow_datasets)."""
    from data import sources

    return os.environ.get("JAXLAB_HF_CACHE") or os.path.join(
        os.path.dirname(os.path.abspath(sources.default_data_dir())), "hf_imports"
    )


def imported_workdir(path: str) -> str:
    """`path` itself if it is a jaxlab workdir; for a Hugging Face GPT-2 directory, its import
    (made once, with the defaults, into hf_import_cache_dir(); made again if the directory's
    files changed). What `config.init_from.workdir` accepts: finetune.py calls this when the run
    starts. Raises HFConvertError as `import_hf` does (another model type than GPT-2, say), and
    in a run of several processes when the import is not made yet (each process would write
    it: import first with tools.hf_convert and name that workdir)."""
    if not is_hugging_face_dir(path):
        return path
    import jax

    source = os.path.abspath(path)
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    workdir = os.path.join(hf_import_cache_dir(), f"{os.path.basename(source)}-{digest}")
    record_path = os.path.join(workdir, IMPORT_RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("source_files") == _source_stamps(source):
            return workdir
    if jax.process_count() > 1:
        raise HFConvertError(
            f"{path} is a Hugging Face directory not imported yet, and this run has "
            f"{jax.process_count()} processes, which would each import it; import it once first "
            f"(python -m tools.hf_convert import --hf_dir={path} --workdir=DIR) and start from "
            "that workdir (config.init_from.workdir, or configs/gpt2_finetune.py:DIR)."
        )
    if os.path.isfile(record_path):
        aside = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(workdir, aside)
        print(f"{source} changed since it was imported; importing it again (the old import is "
              f"in {aside}).", flush=True)  # fmt: skip
    elif os.path.isdir(workdir):  # an import cut off before it finished
        os.rename(workdir, f"{workdir}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"Importing the Hugging Face GPT-2 in {source} into {workdir} (once).", flush=True)
    return import_hf(source, workdir)
