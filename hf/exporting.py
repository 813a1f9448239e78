"""A jaxlab GPT run exported as a Hugging Face GPT-2 directory that `transformers` loads."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from hf.gpt2_files import HF_CONFIG, SAFETENSORS, HFConvertError, hf_config_json
from hf.gpt2_layout import gpt2_refusals, gpt2_shape_of, jaxlab_to_hf


def export_hf(workdir: str, hf_dir: str, step: int | None = None,
              dtype: str = "float32") -> str:  # fmt: skip
    """Writes the run in `workdir` (its newest checkpoint, or `step`) as a Hugging Face GPT-2
    directory: config.json, model.safetensors (keys 'transformer.*', as save_pretrained writes
    them; `dtype` float32, bfloat16 or float16), tokenizer.json, vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json. Returns the directory.

    Raises HFConvertError for a model GPT-2 cannot express (naming every reason), a tokenizer
    that is not byte-level BPE, or a non-empty `hf_dir`; FileNotFoundError and
    checkpointing.CheckpointMismatchError as experiment.restore_run does."""
    import jax
    from safetensors.numpy import save_file

    import experiment
    from data import tokenization
    from models import gpt
    from runtime import distributed

    np_dtype = _export_dtype(dtype)
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        raise HFConvertError(f"--hf_dir={hf_dir} is not empty; export into a new directory.")
    restored = experiment.restore_run(workdir, step)
    model, tokenizer = restored.model, restored.tokenizer
    reasons = gpt2_refusals(model, tokenizer)
    if getattr(model, "moe_num_experts", 0):  # models/moe.py: GPT-2 has one dense MLP a block
        reasons.insert(0, f"moe_num_experts={model.moe_num_experts} (Mixture-of-Experts layers)")
    if reasons:
        raise HFConvertError(
            f"{workdir} cannot be exported as GPT-2: {'; '.join(reasons)}. Only runs of GPT-2's "
            "architecture convert."
        )
    params = distributed.to_host(restored.params)
    del restored
    if model.scan_layers:
        params = gpt.unstack_layers(params)
    shape = gpt2_shape_of(model)
    tensors = jaxlab_to_hf(params, shape)
    if jax.process_index() != 0:
        return hf_dir
    os.makedirs(hf_dir, exist_ok=True)
    tensors = {f"transformer.{k}": v.astype(np_dtype) for k, v in tensors.items()}
    save_file(tensors, os.path.join(hf_dir, SAFETENSORS), metadata={"format": "pt"})
    # safetensors writes the file owner-only (0600); give it the mode of the other files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(hf_dir, SAFETENSORS), 0o666 & ~umask)
    eot = tokenizer.eot_id
    _write_json(
        os.path.join(hf_dir, HF_CONFIG),
        hf_config_json(shape, float(model.dropout_rate), eot, dtype),
    )
    tokenizer.save_hugging_face_files(hf_dir)
    specials = {}
    if eot is not None:
        eot_text = tokenization.END_OF_TEXT
        specials = {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text}
    _write_json(os.path.join(hf_dir, "special_tokens_map.json"), specials)
    _write_json(
        os.path.join(hf_dir, "tokenizer_config.json"),
        {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
         "model_max_length": shape.n_positions, **specials},
    )  # fmt: skip
    return hf_dir


def _export_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if dtype in ("float32", "float16"):
        return np.dtype(dtype)
    raise HFConvertError(f"--dtype={dtype!r}: choose float32, bfloat16 or float16.")


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
