"""Hugging Face GPT-2 checkpoints in and out of jaxlab: a GPT-2 directory becomes a jaxlab run's
workdir, and a jaxlab GPT run becomes a GPT-2 directory.

    python -m tools.hf_convert import --hf_dir=DIR --workdir=DIR [--vocab_pad_multiple=64]
        [--scan_layers] [--dtype=float32]
    python -m tools.hf_convert export --workdir=DIR --hf_dir=DIR [--step=N] [--dtype=float32]

Import reads `config.json` (model_type 'gpt2'), `model.safetensors` (or a sharded
`model.safetensors.index.json`) with safetensors' NumPy API (no PyTorch), and the tokenizer
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`), and writes a workdir exactly as
train.py does: `config.json` (configs/gpt2_small.py's training settings with this model's
shape), `input_spec.json`, the tokenizer files and a verified Orbax checkpoint at step 0, so that
sample.py, evaluate.py, tools.aot (through configs/gpt2_finetune.py) and `config.init_from` use
it like any run. Export restores a run through `experiment.restore_run` and writes
`config.json`, `model.safetensors` (keys as `save_pretrained` names them) and the tokenizer
files, which `transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained`
load. A model GPT-2's architecture cannot express is refused with the reasons.

Layouts (E = n_embd, H = n_head, D = E / H, I = n_inner or 4E, V = vocabulary, P = positions):

    Hugging Face GPT-2 (Conv1D weights are [in, out])   jaxlab GPT (models/gpt.py)
    wte.weight [V, E]                                  wte/embedding [V padded, E] (tied head)
    wpe.weight [P, E]                                  wpe [P, E]
    h.i.ln_1.weight, .bias [E]                         h_i/ln_1/scale, bias
    h.i.attn.c_attn.weight [E, 3E] (q | k | v)         h_i/attn/{query,key,value}/kernel [E, H, D]
    h.i.attn.c_attn.bias [3E]                          h_i/attn/{query,key,value}/bias [H, D]
    h.i.attn.c_proj.weight [E, E], .bias [E]           h_i/attn/out/kernel [H, D, E], bias [E]
    h.i.ln_2.weight, .bias [E]                         h_i/ln_2/scale, bias
    h.i.mlp.c_fc.weight [E, I], .bias [I]              h_i/mlp/fc/kernel [E, I], bias [I]
    h.i.mlp.c_proj.weight [I, E], .bias [E]            h_i/mlp/proj/kernel [I, E], bias [E]
    ln_f.weight, .bias [E]                             ln_f/scale, bias

Each fused c_attn column block holds its H heads one after another (D columns each), as
GPT2Attention's `_split_heads` reads them. GPT-2's activation 'gelu_new' is the tanh
approximation (jaxlab's mlp_activation='gelu_tanh'); 'gelu' is exact GELU in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np

import cli

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

    vocab_size: int  # V: rows of wte (the real vocabulary, no padding)
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


# ----------------------------------------------------------------------------- reading


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
    """The directory's byte-level BPE (tokenizers_lib.BPETokenizer): tokenizer.json as it is, or
    vocab.json + merges.txt. Raises HFConvertError when neither is there, when the file is not
    a byte-level BPE, or when its size differs from config.json's vocab_size (the rows of the
    embedding)."""
    import tokenizers_lib

    tokenizer_json = os.path.join(hf_dir, tokenizers_lib.TOKENIZER_JSON)
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    try:
        if os.path.isfile(tokenizer_json):
            source = tokenizer_json
            tokenizer = tokenizers_lib.BPETokenizer.from_file(tokenizer_json)
            kind = tokenizer.model_type
            if kind != "BPE":
                raise HFConvertError(
                    f"{tokenizer_json} is a {kind} tokenizer, not GPT-2's byte-level BPE; use "
                    "the tokenizer files that came with the GPT-2 checkpoint."
                )
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            source = f"{vocab} + merges.txt"
            tokenizer = tokenizers_lib.BPETokenizer.from_vocab_and_merges(vocab, merges)
        else:
            raise HFConvertError(
                f"{hf_dir} has no tokenizer: neither {tokenizers_lib.TOKENIZER_JSON} nor "
                f"vocab.json + merges.txt; {GPT2_FILES_HELP}."
            )
    except ValueError as e:
        if isinstance(e, HFConvertError):
            raise
        raise HFConvertError(f"{e} Download the tokenizer files again.") from e
    if tokenizer.vocab_size != shape.vocab_size:
        raise HFConvertError(
            f"{source} has {tokenizer.vocab_size} tokens but {os.path.join(hf_dir, HF_CONFIG)} "
            f"(and the embedding) has vocab_size={shape.vocab_size}: they belong to different "
            "models; use the tokenizer files that came with this checkpoint."
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


# ----------------------------------------------------------------------------- layouts


def hf_to_jaxlab(
    weights: dict[str, np.ndarray], shape: GPT2Shape, vocab_rows: int
) -> dict[str, Any]:
    """GPT-2 weights (canonical keys, see the module docstring) -> jaxlab GPT params, unrolled
    layout (h_0 ... h_{L-1}), float32 numpy. The embedding gets `vocab_rows - vocab_size` zero
    rows (the padding, never scored)."""
    e, h, d = shape.n_embd, shape.n_head, shape.head_dim
    wte = weights["wte.weight"]
    pad = np.zeros((vocab_rows - wte.shape[0], e), wte.dtype)
    params: dict[str, Any] = {
        "wte": {"embedding": np.concatenate([wte, pad]) if pad.size else wte},
        "wpe": weights["wpe.weight"],
        "ln_f": {"scale": weights["ln_f.weight"], "bias": weights["ln_f.bias"]},
    }
    for n in range(shape.n_layer):
        w = lambda name, n=n: weights[f"h.{n}.{name}"]  # noqa: E731
        qkv_kernel = np.split(w("attn.c_attn.weight"), 3, axis=1)  # [E, E] each: q | k | v
        qkv_bias = np.split(w("attn.c_attn.bias"), 3)
        attn = {
            name: {
                "kernel": np.ascontiguousarray(kernel.reshape(e, h, d)),
                "bias": bias.reshape(h, d),
            }
            for name, kernel, bias in zip(
                ("query", "key", "value"), qkv_kernel, qkv_bias, strict=True
            )  # fmt: skip
        }
        attn["out"] = {
            "kernel": w("attn.c_proj.weight").reshape(h, d, e),
            "bias": w("attn.c_proj.bias"),
        }
        params[f"h_{n}"] = {
            "ln_1": {"scale": w("ln_1.weight"), "bias": w("ln_1.bias")},
            "attn": attn,
            "ln_2": {"scale": w("ln_2.weight"), "bias": w("ln_2.bias")},
            "mlp": {
                "fc": {"kernel": w("mlp.c_fc.weight"), "bias": w("mlp.c_fc.bias")},
                "proj": {"kernel": w("mlp.c_proj.weight"), "bias": w("mlp.c_proj.bias")},
            },
        }
    return params


def jaxlab_to_hf(params: dict[str, Any], shape: GPT2Shape) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_jaxlab`: unrolled jaxlab GPT params -> GPT-2 weights (canonical
    keys), the embedding cut to the real vocabulary. Raises HFConvertError naming the
    parameters GPT-2 has no place for (every jaxlab parameter must land somewhere)."""
    from flax import traverse_util

    e = shape.n_embd
    used: set[tuple[str, ...]] = set()

    def get(*path: str) -> np.ndarray:
        used.add(path)
        node: Any = params
        for part in path:
            node = node[part]
        return np.asarray(node)

    out = {
        "wte.weight": get("wte", "embedding")[: shape.vocab_size],
        "wpe.weight": get("wpe"),
        "ln_f.weight": get("ln_f", "scale"),
        "ln_f.bias": get("ln_f", "bias"),
    }
    for n in range(shape.n_layer):
        b = f"h_{n}"
        names = ("query", "key", "value")
        out.update(
            {
                f"h.{n}.ln_1.weight": get(b, "ln_1", "scale"),
                f"h.{n}.ln_1.bias": get(b, "ln_1", "bias"),
                f"h.{n}.attn.c_attn.weight": np.concatenate(
                    [get(b, "attn", q, "kernel").reshape(e, e) for q in names], axis=1
                ),
                f"h.{n}.attn.c_attn.bias": np.concatenate(
                    [get(b, "attn", q, "bias").reshape(e) for q in names]
                ),
                f"h.{n}.attn.c_proj.weight": get(b, "attn", "out", "kernel").reshape(e, e),
                f"h.{n}.attn.c_proj.bias": get(b, "attn", "out", "bias"),
                f"h.{n}.ln_2.weight": get(b, "ln_2", "scale"),
                f"h.{n}.ln_2.bias": get(b, "ln_2", "bias"),
                f"h.{n}.mlp.c_fc.weight": get(b, "mlp", "fc", "kernel"),
                f"h.{n}.mlp.c_fc.bias": get(b, "mlp", "fc", "bias"),
                f"h.{n}.mlp.c_proj.weight": get(b, "mlp", "proj", "kernel"),
                f"h.{n}.mlp.c_proj.bias": get(b, "mlp", "proj", "bias"),
            }
        )
    unused = sorted("/".join(p) for p in traverse_util.flatten_dict(params) if p not in used)
    if unused:
        raise HFConvertError(f"the run has parameters GPT-2 has no place for: {unused[:5]}.")
    expected = shape.tensor_shapes()
    for key, value in out.items():
        if value.shape != expected[key]:  # a model whose fields disagree with its parameters
            raise HFConvertError(f"{key}: the run's array is {value.shape}, GPT-2 of this "
                                 f"config needs {expected[key]}.")  # fmt: skip
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- import


def jaxlab_config(
    shape: GPT2Shape,
    tokenizer_path: str,
    *,
    dtype: str = "float32",
    vocab_pad_multiple: int = 1,
    scan_layers: bool = False,
):
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
    written to the config. `vocab_pad_multiple` pads the embedding rows (e.g. 64: 50,257 ->
    50,304) with zeros that are never scored; `scan_layers` stores the blocks stacked for
    `nn.scan`. Raises HFConvertError (missing files, not a GPT-2, shapes disagreeing with
    config.json, a tokenizer of another size) and workdir_files.WorkdirError (the workdir
    already holds a run, or a live run holds it).
    """
    import jax

    import checkpointing
    import experiment
    import tokenizers_lib
    import workdir_files
    from models import gpt

    shape = read_hf_config(hf_dir)
    tokenizer = read_hf_tokenizer(hf_dir, shape)
    weights = read_hf_weights(hf_dir, shape)
    vocab_rows = gpt.padded_vocab_size(shape.vocab_size, vocab_pad_multiple)
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
                os.path.join(workdir, tokenizers_lib.BPE_MODEL),
                dtype=dtype,
                vocab_pad_multiple=vocab_pad_multiple,
                scan_layers=scan_layers,
            )
            spec = workdir_files.InputSpec(np.zeros((1, shape.n_positions), np.int32))
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
    import data_setup

    return os.environ.get("JAXLAB_HF_CACHE") or os.path.join(
        os.path.dirname(os.path.abspath(data_setup.default_data_dir())), "hf_imports"
    )


def imported_workdir(path: str) -> str:
    """`path` itself if it is a jaxlab workdir; for a Hugging Face GPT-2 directory, its import
    (made once, with the defaults, into hf_import_cache_dir(); made again if the directory's
    files changed). What `config.init_from.workdir` and configs/gpt2_finetune.py accept.
    Raises HFConvertError as `import_hf` does (another model type than GPT-2, say)."""
    if not is_hugging_face_dir(path):
        return path
    source = os.path.abspath(path)
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    workdir = os.path.join(hf_import_cache_dir(), f"{os.path.basename(source)}-{digest}")
    record_path = os.path.join(workdir, IMPORT_RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("source_files") == _source_stamps(source):
            return workdir
        aside = f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(workdir, aside)
        print(f"{source} changed since it was imported; importing it again (the old import is "
              f"in {aside}).", flush=True)  # fmt: skip
    elif os.path.isdir(workdir):  # an import cut off before it finished
        os.rename(workdir, f"{workdir}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"Importing the Hugging Face GPT-2 in {source} into {workdir} (once).", flush=True)
    return import_hf(source, workdir)


# ----------------------------------------------------------------------------- export


def gpt2_refusals(model: Any, tokenizer: Any) -> list[str]:
    """Why a jaxlab model (and tokenizer) is not expressible as Hugging Face GPT-2; [] if it
    is. GPT-2 is: learned absolute positions, LayerNorm with biases, multi-head attention with
    biases, a 2-layer exact- or tanh-GELU MLP with biases, an output tied to the embedding, and
    a byte-level BPE tokenizer."""
    from models import gpt

    if not isinstance(model, gpt.GPT):
        return [f"it is a {type(model).__name__}, not a GPT"]
    reasons = []
    checks = [
        (model.position_embedding == "learned",
         f"position_embedding={model.position_embedding!r} (GPT-2 learns absolute positions)"),
        (model.tie_embeddings,
         "tie_embeddings=False (GPT-2's output layer is its token embedding)"),
        (model.norm == "layernorm",
         f"norm={model.norm!r} (GPT-2 uses LayerNorm)"),
        (model.mlp_activation in EXPORT_ACTIVATIONS,
         f"mlp_activation={model.mlp_activation!r} (GPT-2's MLP is "
         "Dense-GELU-Dense: 'gelu' or 'gelu_tanh')"),
        (model.num_kv_heads in (None, model.num_heads),
         f"num_kv_heads={model.num_kv_heads} (GPT-2 has one key/value head "
         "per query head)"),
        (not model.qk_norm, "qk_norm=True (GPT-2 has no query/key norm)"),
        (model.attn_logit_softcap is None,
         "attn_logit_softcap is set (GPT-2 does not cap attention logits)"),
        (model.use_bias, "use_bias=False (every GPT-2 layer has biases)"),
        (tokenizer is not None and tokenizer.kind == "bpe",
         f"its tokenizer is {tokenizer.describe() if tokenizer else 'missing'} (a GPT-2 "
         "directory needs a byte-level BPE: config.tokenizer='bpe' or a tokenizer.json)"),
    ]  # fmt: skip
    for ok, reason in checks:
        if not ok:
            reasons.append(reason)
    return reasons


def gpt2_shape_of(model: Any) -> GPT2Shape:
    """The GPT-2 shape of an exportable jaxlab GPT."""
    hidden = model.mlp_hidden_dim or model.mlp_ratio * model.embed_dim
    return GPT2Shape(
        vocab_size=model.vocab_size,
        n_positions=model.block_size,
        n_embd=model.embed_dim,
        n_layer=model.num_layers,
        n_head=model.num_heads,
        n_inner=hidden,
        activation_function=EXPORT_ACTIVATIONS[model.mlp_activation],
        layer_norm_epsilon=float(model.norm_epsilon),
    )


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

    import distributed
    import experiment
    import tokenizers_lib
    from models import gpt

    np_dtype = _export_dtype(dtype)
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        raise HFConvertError(f"--hf_dir={hf_dir} is not empty; export into a new directory.")
    restored = experiment.restore_run(workdir, step)
    model, tokenizer = restored.model, restored.tokenizer
    reasons = gpt2_refusals(model, tokenizer)
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
        eot_text = tokenizers_lib.END_OF_TEXT
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


# ----------------------------------------------------------------------------- command line

COMMANDS = ("import", "export")


def main(command: str | None, argv: list[str]) -> None:
    """Runs `import` or `export` with the flags; prints what it wrote and how long it took."""
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    if command not in COMMANDS:
        raise HFConvertError(
            f"give a command first: python -m tools.hf_convert {{{'|'.join(COMMANDS)}}} "
            f"(got {command!r})."
        )
    for name in ("hf_dir", "workdir"):
        if not getattr(FLAGS, name):
            raise HFConvertError(f"{command} needs --{name}.")
    start = time.perf_counter()
    if command == "import":
        workdir = import_hf(
            FLAGS.hf_dir,
            FLAGS.workdir,
            vocab_pad_multiple=FLAGS.vocab_pad_multiple,
            scan_layers=FLAGS.scan_layers,
            dtype=FLAGS.dtype,
        )
        print(f"Imported {FLAGS.hf_dir} into {workdir} (step 0) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    else:
        export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step, FLAGS.dtype)
        print(f"Exported {FLAGS.workdir} to {FLAGS.hf_dir} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    from absl import flags

    flags.DEFINE_string("hf_dir", None, "The Hugging Face GPT-2 directory (read or written).")
    flags.DEFINE_string("workdir", None, "The jaxlab workdir (written or read).")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the newest).")
    flags.DEFINE_integer(
        "vocab_pad_multiple",
        1,
        "import: pad the embedding rows to a multiple of this (64: 50,304).",
    )
    flags.DEFINE_bool("scan_layers", False, "import: store the blocks stacked for nn.scan.")
    flags.DEFINE_string("dtype", "float32", "import: the run's compute dtype; export: the "
                        "safetensors dtype (float32, bfloat16, float16).")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    # The command is the first argument (`import` or `export`); absl takes the flags after it.
    command = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    cli.run(lambda argv: main(command, argv))
