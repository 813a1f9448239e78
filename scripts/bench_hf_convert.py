"""Measures Hugging Face GPT-2 conversion at the 124M shape: import and export wall time and peak
memory (RSS) of `python -m tools.hf_convert`, each in its own process.

    python scripts/bench_hf_convert.py [--work=/tmp/jaxlab_bench_hf] [--size=124M]

No weights can be downloaded here, so the script writes a stand-in of the `gpt2` repository's
files with GPT-2's exact shapes and layout: config.json (gpt2's), model.safetensors with random
float32 weights made with NumPy (keys without the 'transformer.' prefix and with the causal-mask
buffers `h.N.attn.bias`, as the hub's gpt2 file has them), and a byte-level BPE of 50,257
tokens (256 bytes, 50,000 synthetic merges, <|endoftext|> last, as GPT-2's vocab.json is
ordered) as tokenizer.json, vocab.json and merges.txt. Conversion reads every file regardless of
what the numbers are, so the time and memory are those of the real checkpoint.

Prints one line per measurement and a JSON line at the end; also checks that the exported
arrays equal the stand-in's bit for bit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from runtime import cli  # noqa: E402

FLAGS = flags.FLAGS
# The GPT-2 family's shapes (n_layer, n_head, n_embd), as Hugging Face's config.json files.
SIZES = {"124M": (12, 12, 768), "355M": (24, 16, 1024), "774M": (36, 20, 1280),
         "1.5B": (48, 25, 1600)}  # fmt: skip
VOCAB, POSITIONS = 50257, 1024


def write_stand_in(directory: str, size: str, seed: int = 0) -> int:
    """Writes the GPT-2 stand-in described in the module docstring; returns the parameter
    count (the unique weights; the mask buffers are not parameters)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from data import tokenization
    from hf import gpt2_files

    n_layer, n_head, n_embd = SIZES[size]
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = gpt2_files.GPT2Shape(VOCAB, POSITIONS, n_embd, n_layer, n_head, 4 * n_embd,
                                 "gelu_new", 1e-5)  # fmt: skip
    tensors = {}
    for key, dims in shape.tensor_shapes().items():
        tensors[key] = (0.02 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)
    mask = np.tril(np.ones((POSITIONS, POSITIONS), np.float32))[None, None]
    for n in range(n_layer):
        tensors[f"h.{n}.attn.bias"] = mask
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = gpt2_files.hf_config_json(shape, 0.1, VOCAB - 1, "float32")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    # 256 byte symbols, then 50,000 merges of two existing tokens (a new token each), then
    # <|endoftext|>: GPT-2's vocabulary layout.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens, known, merges = list(alphabet), set(alphabet), []
    while len(merges) < VOCAB - 257:
        a, b = tokens[rng.integers(len(tokens))], tokens[rng.integers(len(tokens))]
        if len(a) + len(b) <= 12 and a + b not in known:
            merges.append((a, b))
            tokens.append(a + b)
            known.add(a + b)
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab[tokenization.END_OF_TEXT] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenization.END_OF_TEXT])
    tokenization.BPETokenizer(tok.to_str()).save_hugging_face_files(directory)
    return sum(int(np.prod(d)) for d in shape.tensor_shapes().values())


def run_measured(args: list[str]) -> tuple[float, float]:
    """Runs `python -m tools.hf_convert *args`; returns (wall seconds, peak RSS in GiB) of that
    process alone (os.wait4's resource usage of the child)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tools.hf_convert", *args], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"ERROR: tools.hf_convert {args[0]} failed (status {status}).")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main(argv: list[str]) -> None:
    """Writes the stand-in, imports it, exports it back, compares, prints the figures."""
    del argv
    from safetensors.numpy import load_file

    work = os.path.abspath(FLAGS.work)
    shutil.rmtree(work, ignore_errors=True)
    hf_dir, workdir, exported = (os.path.join(work, n) for n in ("hf", "run", "exported"))
    start = time.perf_counter()
    num_params = write_stand_in(hf_dir, FLAGS.size)
    file_gb = os.path.getsize(os.path.join(hf_dir, "model.safetensors")) / 2**30
    written_s = time.perf_counter() - start
    print(f"stand-in GPT-2 {FLAGS.size}: {num_params:,} parameters, model.safetensors "
          f"{file_gb:.2f} GiB, written in {written_s:.1f} s", flush=True)  # fmt: skip
    import_s, import_gb = run_measured(["import", f"--hf_dir={hf_dir}", f"--workdir={workdir}"])
    print(f"import: {import_s:.1f} s, peak RSS {import_gb:.2f} GiB", flush=True)
    export_s, export_gb = run_measured(["export", f"--workdir={workdir}", f"--hf_dir={exported}"])
    print(f"export: {export_s:.1f} s, peak RSS {export_gb:.2f} GiB", flush=True)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    back = load_file(os.path.join(exported, "model.safetensors"))
    same = all(
        back["transformer." + k].tobytes() == v.tobytes()
        for k, v in original.items()
        if not k.endswith(".attn.bias")
    )
    print(f"exported arrays equal the stand-in's bit for bit: {same}", flush=True)
    print(json.dumps({"size": FLAGS.size, "num_params": num_params, "import_s": round(import_s, 1),
                      "import_peak_rss_gib": round(import_gb, 2), "export_s": round(export_s, 1),
                      "export_peak_rss_gib": round(export_gb, 2), "bit_for_bit": same,
                      "this_process_peak_rss_gib": round(resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))  # fmt: skip
    if not same:
        raise SystemExit("ERROR: the exported arrays differ from the imported ones.")


if __name__ == "__main__":
    flags.DEFINE_string("work", "/tmp/jaxlab_bench_hf", "Scratch directory (emptied first).")
    flags.DEFINE_enum("size", "124M", list(SIZES), "Which GPT-2 shape to measure.")
    cli.run(main)
