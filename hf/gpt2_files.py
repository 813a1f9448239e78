"""Hugging Face GPT-2 directories as `save_pretrained` writes them: config.json, the safetensors
weights and the tokenizer files, read and checked against each other (NumPy only, no PyTorch),
and the config.json an export writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from runtime import cli

GPT2_FILES_HELP = (
    "a Hugging Face GPT-2 directory holds config.json, model.safetensors and tokenizer.json (or "
    "vocab.json + merges.txt); `huggingface-cli download gpt2 --local-dir DIR` fetches one"
)
HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
IMPORT_RECORD = "hf_import.json"  # in an imported workdir: where it came from
# Hugging Face activation names -> jaxlab's GPT.mlp_activation, and back.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# Causal-mask buffers that older GPT-2 checkpoints store beside the weights: not parameters.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class HFConvertError(cli.UserError, ValueError):
    """A Hugging Face directory or a jaxlab run cannot be converted; the message names the file
    (or field) and the fix."""


@dataclasses.dataclass(frozen=True)
class GPT2Shape:
    """The sizes of a GPT-2, as Hugging Face's config.json names them."""

    # V: rows of wte. Read from config.json it may exceed the tokenizer (padding rows); the
    # shape jaxlab builds and exports has the tokenizer's size.
    vocab_size: int
    n_positions: int  # P: the context length
    n_embd: int  # E
    n_layer: int
    n_head: int  # H
    n_inner: int  # I: MLP width (config.json's null means 4 E)
    activation_function: str
    layer_norm_epsilon: float

    @property
    def head_dim(self) -> int:
        """D = E / H."""
        return self.n_embd // self.n_head

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """{key without the 'transformer.' prefix: shape} of every GPT-2 weight."""
        e, i = self.n_embd, self.n_inner
        shapes = {
            "wte.weight": (self.vocab_size, e),
            "wpe.weight": (self.n_positions, e),
            "ln_f.weight": (e,),
            "ln_f.bias": (e,),
        }
        for n in range(self.n_layer):
            shapes.update(
                {
                    f"h.{n}.ln_1.weight": (e,),
                    f"h.{n}.ln_1.bias": (e,),
                    f"h.{n}.attn.c_attn.weight": (e, 3 * e),
                    f"h.{n}.attn.c_attn.bias": (3 * e,),
                    f"h.{n}.attn.c_proj.weight": (e, e),
                    f"h.{n}.attn.c_proj.bias": (e,),
                    f"h.{n}.ln_2.weight": (e,),
                    f"h.{n}.ln_2.bias": (e,),
                    f"h.{n}.mlp.c_fc.weight": (e, i),
                    f"h.{n}.mlp.c_fc.bias": (i,),
                    f"h.{n}.mlp.c_proj.weight": (i, e),
                    f"h.{n}.mlp.c_proj.bias": (e,),
                }
            )
        return shapes


def is_hugging_face_dir(path: str) -> bool:
    """True if `path` is a Hugging Face model directory (its config.json has a model_type), as
    opposed to a jaxlab workdir (whose config.json is a run config)."""
    try:
        with open(os.path.join(path, HF_CONFIG)) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def read_hf_config(hf_dir: str) -> GPT2Shape:
    """The shape config.json describes. Raises HFConvertError if the file is missing or
    unreadable, is not a GPT-2 (model_type), or asks for a variant jaxlab's GPT does not
    compute (untied output, cross-attention, other attention scaling, another activation)."""
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isdir(hf_dir):
        raise HFConvertError(f"--hf_dir={hf_dir} is not a directory; {GPT2_FILES_HELP}.")
    if not os.path.isfile(path):
        raise HFConvertError(f"{path} not found; {GPT2_FILES_HELP}.")
    try:
        with open(path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise HFConvertError(f"{path} is not valid JSON ({e}); download it again.") from e
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise HFConvertError(
            f"{path} describes a {model_type!r} model (architectures "
            f"{hf.get('architectures')}); only GPT-2 (model_type 'gpt2') converts to jaxlab's "
            "GPT. Use a GPT-2 checkpoint (gpt2, gpt2-medium, gpt2-large, gpt2-xl or a fine-tune "
            "of one)."
        )
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    if missing or ("n_positions" not in hf and "n_ctx" not in hf):
        raise HFConvertError(f"{path} lacks {missing or ['n_positions']}; download it again.")
    refusals = {
        "tie_word_embeddings": (True, "an output layer untied from the token embedding"),
        "add_cross_attention": (False, "cross-attention"),
        "scale_attn_weights": (True, "attention scores not divided by sqrt(head_dim)"),
        "scale_attn_by_inverse_layer_idx": (False, "attention scaled by 1/layer"),
    }
    for key, (wanted, what) in refusals.items():
        if hf.get(key, wanted) != wanted:
            raise HFConvertError(
                f"{path} has {key}={hf[key]!r}: {what}, which jaxlab's GPT does not compute; "
                f"only GPT-2 checkpoints with {key}={wanted} convert."
            )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise HFConvertError(
            f"{path} has activation_function={activation!r}; jaxlab's GPT computes "
            f"{sorted(ACTIVATIONS)} only."
        )
    if hf["n_embd"] % hf["n_head"]:
        raise HFConvertError(f"{path}: n_embd={hf['n_embd']} does not divide by n_head="
                             f"{hf['n_head']}; download it again.")  # fmt: skip
    return GPT2Shape(
        vocab_size=int(hf["vocab_size"]),
        n_positions=int(hf.get("n_positions", hf.get("n_ctx"))),
        n_embd=int(hf["n_embd"]),
        n_layer=int(hf["n_layer"]),
        n_head=int(hf["n_head"]),
        n_inner=int(hf.get("n_inner") or 4 * hf["n_embd"]),
        activation_function=activation,
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def read_hf_tokenizer(hf_dir: str, shape: GPT2Shape):
    """The directory's byte-level BPE (tokenization.BPETokenizer): tokenizer.json as it is, or
    vocab.json + merges.txt. Raises HFConvertError when neither is there, when the file is not
    a byte-level BPE, or when it has more tokens than config.json's vocab_size (the rows of the
    embedding: a token without a row). Fewer tokens than rows is an embedding padded beyond its
    tokenizer (nanoGPT's 50,304 rows for GPT-2's 50,257 tokens), as `transformers` accepts: the
    rows past the tokenizer are never a token's, so they are never scored or sampled."""
    from data import tokenization

    tokenizer_json = os.path.join(hf_dir, tokenization.TOKENIZER_JSON)
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    try:
        if os.path.isfile(tokenizer_json):
            source = tokenizer_json
            tokenizer = tokenization.BPETokenizer.from_file(tokenizer_json)
            kind = tokenizer.model_type
            if kind != "BPE":
                raise HFConvertError(
                    f"{tokenizer_json} is a {kind} tokenizer, not GPT-2's byte-level BPE; use "
                    "the tokenizer files that came with the GPT-2 checkpoint."
                )
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            source = f"{vocab} + merges.txt"
            tokenizer = tokenization.BPETokenizer.from_vocab_and_merges(vocab, merges)
        else:
            raise HFConvertError(
                f"{hf_dir} has no tokenizer: neither {tokenization.TOKENIZER_JSON} nor "
                f"vocab.json + merges.txt; {GPT2_FILES_HELP}."
            )
    except ValueError as e:
        if isinstance(e, HFConvertError):
            raise
        raise HFConvertError(f"{e} Download the tokenizer files again.") from e
    if tokenizer.vocab_size > shape.vocab_size:
        raise HFConvertError(
            f"{source} has {tokenizer.vocab_size} tokens but {os.path.join(hf_dir, HF_CONFIG)} "
            f"(and the embedding) has vocab_size={shape.vocab_size}: token ids "
            f"{shape.vocab_size}..{tokenizer.vocab_size - 1} would have no embedding row, so "
            "they belong to different models; use the tokenizer files that came with this "
            "checkpoint."
        )
    return tokenizer


def _safetensors_files(hf_dir: str) -> list[str]:
    """The safetensors file(s) holding the weights; HFConvertError naming the fix if none."""
    single, index = os.path.join(hf_dir, SAFETENSORS), os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise HFConvertError(f"{index} is not a safetensors index ({e}); download it "
                                 "again.") from e  # fmt: skip
        files = [os.path.join(hf_dir, n) for n in names]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise HFConvertError(f"{absent[0]} (listed in {index}) not found; download it.")
        return files
    bins = [
        n for n in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(hf_dir, n))
    ]
    hint = (
        f" (it has {bins[0]}, which needs PyTorch to read: download the checkpoint's "
        "model.safetensors instead, as the Hugging Face hub offers it for GPT-2)"
        if bins
        else ""
    )
    raise HFConvertError(f"{single} not found{hint}; {GPT2_FILES_HELP}.")


def _canonical_key(key: str) -> str:
    """A safetensors key without the 'transformer.' prefix save_pretrained puts before it."""
    return key[len("transformer.") :] if key.startswith("transformer.") else key


def read_hf_weights(hf_dir: str, shape: GPT2Shape) -> dict[str, np.ndarray]:
    """The GPT-2 weights {canonical key: float32 array}. Every key and shape is checked against
    config.json first, from the file headers (nothing is read until they agree). Raises
    HFConvertError naming the file and key for a missing, unexpected or misshapen tensor, and
    for an untied lm_head."""
    from safetensors import safe_open

    expected = shape.tensor_shapes()
    config_path = os.path.join(hf_dir, HF_CONFIG)
    files = _safetensors_files(hf_dir)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}  # canonical key -> (file, shape)
    stored_key: dict[str, str] = {}  # canonical key -> the key in its file
    for path in files:
        try:
            with safe_open(path, framework="np") as f:
                for key in f.keys():
                    found[_canonical_key(key)] = (path, tuple(f.get_slice(key).get_shape()))
                    stored_key[_canonical_key(key)] = key
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise HFConvertError(f"{path} is not a readable safetensors file ({e}); download "
                                 "it again.") from e  # fmt: skip
    for key, (path, got) in sorted(found.items()):
        if key in expected and got != expected[key]:
            raise HFConvertError(
                f"{path}: {key} has shape {got}, but {config_path} (n_embd={shape.n_embd}, "
                f"n_head={shape.n_head}, n_inner={shape.n_inner}, vocab_size={shape.vocab_size}, "
                f"n_positions={shape.n_positions}) makes it {expected[key]}: the two files are "
                "from different models; download them together again."
            )
    missing = [k for k in expected if k not in found]
    if missing:
        raise HFConvertError(
            f"{files[0]} lacks {len(missing)} of the {len(expected)} "
            f"tensors {config_path} calls for (e.g. {missing[:3]}): it is not this GPT-2's "
            "checkpoint (or is incomplete); download it again."
        )
    extra = [
        k for k in found if k not in expected and k != "lm_head.weight"
        and not k.endswith(_BUFFER_SUFFIXES)
    ]  # fmt: skip
    if extra:
        raise HFConvertError(
            f"{found[extra[0]][0]} holds tensors a GPT-2 of {config_path} has no place for "
            f"(e.g. {extra[:3]}): not a plain GPT2LMHeadModel checkpoint."
        )
    # Only the tensors a GPT-2 uses (not the attention-mask buffers some files carry).
    wanted = [k for k in (*expected, "lm_head.weight") if k in found]
    arrays: dict[str, np.ndarray] = {}
    for path in sorted({found[k][0] for k in wanted}):
        with safe_open(path, framework="np") as f:
            for key in wanted:
                if found[key][0] == path:
                    arrays[key] = f.get_tensor(stored_key[key])
    head = arrays.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, arrays["wte.weight"]):
        raise HFConvertError(
            f"{found['lm_head.weight'][0]}: lm_head.weight differs from wte.weight (an untied "
            "output layer); jaxlab imports GPT-2 with the output tied to the embedding."
        )
    return {k: np.asarray(arrays[k], np.float32) for k in expected}


def hf_config_json(shape: GPT2Shape, dropout_rate: float, eot_id: int | None,
                   dtype: str) -> dict[str, Any]:  # fmt: skip
    """Hugging Face's config.json for a GPT2LMHeadModel of `shape`."""
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape.vocab_size,
        "n_positions": shape.n_positions,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "n_inner": None if shape.n_inner == 4 * shape.n_embd else shape.n_inner,
        "activation_function": shape.activation_function,
        "resid_pdrop": dropout_rate,
        "embd_pdrop": dropout_rate,
        "attn_pdrop": dropout_rate,
        "layer_norm_epsilon": shape.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": dtype,
    }
    if eot_id is not None:
        config.update(bos_token_id=eot_id, eos_token_id=eot_id)
    return config
