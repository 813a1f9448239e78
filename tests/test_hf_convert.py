"""Hugging Face GPT-2 in and out (tools/hf_convert.py, hf/), against `transformers` itself.

A small random GPT-2 (2 layers, width 64, a byte-level BPE trained offline with `tokenizers`) is
built and saved with `save_pretrained` by tests/hf_reference.py under .venv-torch (PyTorch and
transformers: `make torch-env`, which `make test` runs), once per session; the same helper
computes transformers' logits, greedy generations and token ids. jaxlab never imports either.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import experiment
import sampling
import train
from data import prepare, sources, tokenization
from hf import exporting, gpt2_files, gpt2_layout, importing
from models import gpt
from runtime import workdir_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = os.path.join(REPO, ".venv-torch", "bin", "python")
# Without conftest's deprecation-as-error rule: PyTorch's and transformers' are not ours.
_TORCH_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
REFERENCE = os.path.join(REPO, "tests", "hf_reference.py")
GREEDY_TOKENS = 50


def _reference(*args: str) -> None:
    """Runs tests/hf_reference.py under PyTorch's environment."""
    result = subprocess.run([TORCH_PYTHON, REFERENCE, *args], capture_output=True, text=True,
                            timeout=600, env=_TORCH_ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _kjv_paragraph() -> str:
    """John 1:1-14 of the King James Bible (Debian's bible-kjv-text), verse numbers stripped."""
    text = sources.load_text_corpus("kjv")
    start = text.index("In the beginning was the Word")
    return text[start : start + 1500]


def _logits(workdir: str, tokens: np.ndarray) -> np.ndarray:
    restored = experiment.restore_run(workdir)
    return np.asarray(restored.model.apply({"params": restored.params}, tokens))


def _shared_dir(tmp_path_factory) -> pathlib.Path:
    """This session's temporary root, the same for every pytest-xdist worker (the parent of
    the workers' own roots), so that the reference is built once per session."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _build_reference(shared: pathlib.Path) -> pathlib.Path:
    """Builds the reference GPT-2 and transformers' outputs on it into shared/hf_reference,
    once: the first worker builds under an exclusive lock, the others wait and reuse it."""
    out = shared / "hf_reference"
    fd = os.open(str(shared / "hf_reference.lock"), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            corpus = out / "corpus.txt"
            corpus.write_text(sources.load_text_corpus("tiny_shakespeare")[:300_000])
            rng = np.random.default_rng(0)
            np.save(out / "tokens.npy", rng.integers(0, 512, size=(3, 40)).astype(np.int32))
            np.save(out / "prompt.npy", rng.integers(0, 512, size=(2, 8)).astype(np.int32))
            (out / "kjv.txt").write_text(_kjv_paragraph())
            hf_dir = out / "gpt2_tiny"
            _reference(f"--build={hf_dir}", f"--corpus={corpus}", "--vocab_size=512",
                       f"--hf_dir={hf_dir}", f"--tokens={out / 'tokens.npy'}",
                       f"--logits={out / 'logits.npy'}", f"--prompt={out / 'prompt.npy'}",
                       f"--max_new_tokens={GREEDY_TOKENS}",
                       f"--generated={out / 'generated.npy'}", f"--text={out / 'kjv.txt'}",
                       f"--ids={out / 'kjv_ids.npy'}")  # fmt: skip
            (out / "done").touch()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> types.SimpleNamespace:
    """The reference GPT-2 directory, transformers' outputs on it (both shared, read-only), and
    this worker's jaxlab import of it."""
    usable = (
        os.path.exists(TORCH_PYTHON)
        and subprocess.run(
            [TORCH_PYTHON, "-c", "import transformers, torch"],
            capture_output=True,
            env=_TORCH_ENV,
        ).returncode
        == 0
    )
    if not usable:
        pytest.skip("needs .venv-torch with torch and transformers: run `make torch-env`")
    shared = _build_reference(_shared_dir(tmp_path_factory))
    root = tmp_path_factory.mktemp("hf")
    hf_dir = str(shared / "gpt2_tiny")
    return types.SimpleNamespace(
        root=root,
        hf_dir=hf_dir,
        workdir=importing.import_hf(hf_dir, str(root / "imported")),
        tokens=np.load(shared / "tokens.npy"),
        prompt=np.load(shared / "prompt.npy"),
        kjv=(shared / "kjv.txt").read_text(),
        logits=np.load(shared / "logits.npy"),
        generated=np.load(shared / "generated.npy"),
        kjv_ids=np.load(shared / "kjv_ids.npy"),
    )


@pytest.fixture(scope="module")
def shakespeare_tokens(ref) -> str:
    """Tiny Shakespeare prepared with the reference's tokenizer (in the test's own folder)."""
    out = str(ref.root / "shakespeare_tokens")
    tokenizer = os.path.join(ref.hf_dir, "tokenizer.json")
    prepare.prepare("tiny_shakespeare", tokenizer, out, progress=False)
    return out


def test_imported_logits_equal_transformers(ref):
    """jaxlab's float32 logits of the imported model on random tokens equal transformers'."""
    ours = _logits(ref.workdir, ref.tokens)
    assert ours.shape == ref.logits.shape == (3, 40, 512)
    np.testing.assert_allclose(ours, ref.logits, atol=1e-5, rtol=0)
    # The run's config records every GPT field at a real value (fine-tuning may override any).
    model = experiment.restore_run(ref.workdir).config.model
    assert model.qk_norm is False and model.attention_impl == "auto", model


def test_padded_scanned_import_gives_the_same_logits_and_exports_bit_for_bit(ref, tmp_path):
    """Imported with the embedding padded (512 rows to 576, vocab_pad_multiple=192) and the
    layers stacked for nn.scan: the same logits over the real vocabulary; exporting it drops
    the padding and gives back the original arrays bit for bit."""
    workdir = importing.import_hf(ref.hf_dir, str(tmp_path / "padded"), vocab_pad_multiple=192,
                                   scan_layers=True)  # fmt: skip
    restored = experiment.restore_run(workdir)
    assert restored.params["wte"]["embedding"].shape == (576, 64)
    assert restored.params["h"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
    np.testing.assert_array_equal(np.asarray(restored.params["wte"]["embedding"])[512:], 0)
    logits = np.asarray(restored.model.apply({"params": restored.params}, ref.tokens))
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5, rtol=0)

    out = exporting.export_hf(workdir, str(tmp_path / "exported"))
    original = load_file(os.path.join(ref.hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key


def test_import_then_export_reproduces_the_safetensors_bit_for_bit(ref, tmp_path):
    """The plain import exported again: the same keys, dtypes and bytes; the same tokenizer."""
    out = exporting.export_hf(ref.workdir, str(tmp_path / "exported"))
    original = load_file(os.path.join(ref.hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(exported[k].tobytes() == original[k].tobytes() for k in original)
    with (
        open(os.path.join(ref.hf_dir, "tokenizer.json")) as a,
        open(os.path.join(out, "tokenizer.json")) as b,
    ):
        assert a.read() == b.read()


def test_tokenization_equals_transformers_on_kjv(ref, tmp_path):
    """The imported tokenizer (from tokenizer.json) and one built from vocab.json + merges.txt
    alone give transformers' AutoTokenizer ids on a KJV paragraph, and decode back to it."""
    tokenizer = tokenization.load_tokenizer(ref.workdir)
    ids = tokenizer.encode(ref.kjv)
    np.testing.assert_array_equal(ids, ref.kjv_ids)
    assert tokenizer.decode(ids) == ref.kjv

    legacy = tmp_path / "legacy"
    shutil.copytree(ref.hf_dir, legacy)
    tokenizer.save_hugging_face_files(str(legacy))  # writes vocab.json and merges.txt
    os.remove(legacy / "tokenizer.json")
    shape = gpt2_files.read_hf_config(str(legacy))
    from_merges = gpt2_files.read_hf_tokenizer(str(legacy), shape)
    np.testing.assert_array_equal(from_merges.encode(ref.kjv + "<|endoftext|>"),
                                  tokenizer.encode(ref.kjv + "<|endoftext|>"))  # fmt: skip
    # Text that spells the separator is ordinary text (tiktoken's encode_ordinary, as nanoGPT
    # prepares): its 13 characters' tokens, never the end-of-text id.
    assert tokenizer.eot_id not in from_merges.encode("<|endoftext|>").tolist()


def test_greedy_decoding_equals_transformers_generate(ref):
    """50 greedy tokens from the imported model (sampling.generate, KV cache) equal
    transformers' generate(do_sample=False)."""
    restored = experiment.restore_run(ref.workdir)
    out = sampling.generate(restored.model, restored.params, ref.prompt, jax.random.key(0),
                            GREEDY_TOKENS, temperature=0.0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), ref.generated)


def test_sample_command_runs_on_the_imported_run(ref):
    """sample.py, unchanged, on the imported workdir: it restores it, continues the prompt with
    GPT-2's tokenizer and reports the speed."""
    result = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={ref.workdir}", "--prompt=ROMEO:",
         "--num_samples=1", "--max_new_tokens=8", "--temperature=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROMEO:" in result.stdout and "tokens/s" in result.stdout, result.stdout


def test_exported_run_loads_in_transformers_with_equal_logits(ref, shakespeare_tokens, tmp_path):
    """A GPT trained by jaxlab (exact GELU, its own width, vocabulary padded to 64, scanned
    layers) exported as GPT-2: GPT2LMHeadModel.from_pretrained and AutoTokenizer load it, and
    its logits and token ids equal jaxlab's."""
    config = importing.jaxlab_config(
        gpt2_files.GPT2Shape(512, 64, 32, 2, 2, 128, "gelu", 1e-5),
        os.path.join(ref.hf_dir, "tokenizer.json"),
        vocab_pad_multiple=64,
        scan_layers=True,
    )
    config.dataset = shakespeare_tokens
    config.model.mlp_hidden_dim = 96  # GPT-2's n_inner, other than 4 x width
    config.update(batch_size=4, num_train_steps=3, warmup_steps=1, decay_steps=3,
                  learning_rate=1e-2, log_every_steps=3, eval_every_steps=100, eval_steps=1,
                  eval_batch_size=4, checkpoint_every_steps=100, async_checkpointing=False,
                  sample_every_eval=False)  # fmt: skip
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    hf_dir = exporting.export_hf(workdir, str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        exported_config = json.load(f)
    assert exported_config["activation_function"] == "gelu"
    assert exported_config["n_inner"] == 96

    tokens = ref.tokens[:, :30]
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "kjv.txt").write_text(ref.kjv)
    _reference(f"--hf_dir={hf_dir}", f"--tokens={tmp_path / 'tokens.npy'}",
               f"--logits={tmp_path / 'logits.npy'}", f"--text={tmp_path / 'kjv.txt'}",
               f"--ids={tmp_path / 'ids.npy'}", f"--info={tmp_path / 'info.json'}")  # fmt: skip
    np.testing.assert_allclose(_logits(workdir, tokens), np.load(tmp_path / "logits.npy"),
                               atol=1e-5, rtol=0)  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), ref.kjv_ids)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["vocab_size"] == 512 and "GPT2" in info["tokenizer_class"]


def test_finetuning_from_the_hugging_face_directory_lowers_the_loss(
    ref, shakespeare_tokens, tmp_path, monkeypatch, capsys
):
    """configs/gpt2_finetune.py pointed at the Hugging Face directory itself: the config only
    names it (and reads its config.json: the import's model and the directory's tokenizer),
    importing nothing; the run imports it once into the cache when it starts (finetune.py),
    every parameter is copied (none re-initialised), and a few steps on Tiny Shakespeare lower
    the validation loss that evaluate.py reports (the imported run evaluated on its config's
    own dataset, Tiny Shakespeare with GPT-2's tokenizer)."""
    import evaluate
    from configs import gpt2_finetune

    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXLAB_HF_CACHE", str(cache))
    monkeypatch.setenv("JAXLAB_TOKENS_DIR", str(tmp_path / "tokens"))  # evaluate.py prepares
    config = gpt2_finetune.get_config(ref.hf_dir)
    assert not cache.exists()  # a config is data: parsing it converts nothing
    assert config.init_from.workdir == ref.hf_dir
    assert config.tokenizer == os.path.join(ref.hf_dir, "tokenizer.json")
    # The same run as when starting from an import of the directory (ref.workdir), but the
    # source's name and where its tokenizer file lies.
    from_import = gpt2_finetune.get_config(ref.workdir)
    for c in (config, from_import):
        c.init_from.workdir, c.tokenizer = "SOURCE", "TOKENIZER"
    assert config.to_dict() == from_import.to_dict()

    config = gpt2_finetune.get_config(ref.hf_dir)
    config.dataset = shakespeare_tokens
    config.update(batch_size=8, grad_accum_steps=1, num_train_steps=6, learning_rate=3e-3,
                  min_learning_rate=3e-3, eval_every_steps=100, eval_steps=1, eval_batch_size=8,
                  checkpoint_every_steps=100, async_checkpointing=False, sample_every_eval=False,
                  log_every_steps=3)  # fmt: skip
    workdir = str(tmp_path / "finetuned")
    train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    cached = importing.imported_workdir(ref.hf_dir)  # made by the run: reused, not imported again
    assert cached.startswith(str(cache))
    assert out.count(f"Importing the Hugging Face GPT-2 in {ref.hf_dir} into {cached}") == 1
    assert "Importing" not in capsys.readouterr().out
    num_arrays = len(jax.tree.leaves(experiment.restore_run(cached).params))
    assert (
        f"init_from {cached} (step 0): copied {num_arrays} parameter arrays; "
        "re-initialised 0: []" in out
    )
    settings = dict(split="val", eval_batch_size=8, eval_steps=4)
    before = evaluate.evaluate_checkpoint(cached, output=str(tmp_path / "before.json"), **settings)
    after = evaluate.evaluate_checkpoint(workdir, **settings)
    assert before["step"] == 0 and after["step"] == 6
    assert after["loss"] < before["loss"] - 0.1, (before["loss"], after["loss"])


def _finetune_run(ref, source: str, shakespeare_tokens: str, reinit: tuple[str, ...] = (), **model):
    """configs/gpt2_finetune.py on `source` with `model` fields changed, built on the prepared
    Tiny Shakespeare (GPT-2's tokenizer), and its state after init_from."""
    import finetune
    from configs import gpt2_finetune

    config = gpt2_finetune.get_config(source)
    # The prepared data names the reference's tokenizer.json (a copy of it elsewhere is the
    # same tokenizer under another path).
    config.tokenizer = os.path.join(ref.hf_dir, "tokenizer.json")
    config.dataset = shakespeare_tokens
    config.update(batch_size=8, grad_accum_steps=1, eval_batch_size=8)
    config.init_from.reinit = reinit
    config.model.update(model)
    run = experiment.build_run(config)
    return run, jax.device_get(finetune.init_from(run, run.init_state()))


def test_a_hugging_face_source_converts_into_either_block_layout(
    ref, shakespeare_tokens, tmp_path, monkeypatch, capsys
):
    """The Hugging Face directory (imported unscanned) fine-tuned with scan_layers=True (the
    layout of configs/gpt2_medium.py and up), and a scanned import (--scan_layers) fine-tuned
    with scan_layers=False: every block is copied, the model computes transformers' logits and
    nothing is re-initialised. (Before: every block started afresh and the run went on.)"""
    monkeypatch.setenv("JAXLAB_HF_CACHE", str(tmp_path / "cache"))
    run, state = _finetune_run(ref, ref.hf_dir, shakespeare_tokens, scan_layers=True)
    assert state.params["h"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)
    logits = np.asarray(run.model.apply({"params": state.params}, ref.tokens))
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5, rtol=0)
    out = capsys.readouterr().out
    assert f"copied {len(jax.tree.leaves(state.params))} parameter arrays; re-initialised 0" in out
    assert "h_0 ... h_1 stacked into h" in out

    scanned = importing.import_hf(ref.hf_dir, str(tmp_path / "scanned"), scan_layers=True)
    run, state = _finetune_run(ref, scanned, shakespeare_tokens, scan_layers=False)
    assert sorted(k for k in state.params if k.startswith("h")) == ["h_0", "h_1"]
    logits = np.asarray(run.model.apply({"params": state.params}, ref.tokens))
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5, rtol=0)
    assert "unstacked into h_0 ... h_1" in capsys.readouterr().out


def test_a_hugging_face_source_that_does_not_fit_is_refused(
    ref, shakespeare_tokens, tmp_path, monkeypatch
):
    """A model without biases (configs/gpt2_small.py's and gpt2_medium.py's nanoGPT default)
    from GPT-2, which has them, and one a block deeper (scanned: every stacked array's shape
    differs): refused in one line naming the paths. Unrolled, the deeper model starts when
    init_from.reinit names its new block: the two others are GPT-2's."""
    import finetune

    monkeypatch.setenv("JAXLAB_HF_CACHE", str(tmp_path / "cache"))
    cases = [
        ({"use_bias": False}, r"the model has no place for the source's .*h_0/attn/key/bias"),
        ({"num_layers": 3, "scan_layers": True},
         r"shape \(2, 64\) in the source, \(3, 64\) in the model: [^;]*h/ln_1/bias"),
    ]  # fmt: skip
    for model, message in cases:
        with pytest.raises(finetune.InitFromError, match=message) as error:
            _finetune_run(ref, ref.hf_dir, shakespeare_tokens, **model)
        assert "\n" not in str(error.value)
    _, state = _finetune_run(ref, ref.hf_dir, shakespeare_tokens, reinit=("h_2",), num_layers=3)
    imported = experiment.restore_run(importing.imported_workdir(ref.hf_dir)).params
    for name in ("h_0", "h_1"):
        for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(imported[name]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)


def _padded_copy(ref, tmp_path, rows: int) -> str:
    """The reference directory with its embedding padded beyond the tokenizer, as nanoGPT pads
    GPT-2's 50,257 tokens to 50,304 rows: config.json's vocab_size = `rows`, the tokenizer
    unchanged (512 tokens). The padding rows are large, so that a model scoring them would
    pick them. Written with safetensors + NumPy (no PyTorch)."""
    from safetensors.numpy import save_file

    target = tmp_path / "padded"
    shutil.copytree(ref.hf_dir, target)
    tensors = load_file(str(target / "model.safetensors"))
    rng = np.random.default_rng(0)
    for key in [k for k in tensors if k.endswith(("wte.weight", "lm_head.weight"))]:
        wte = tensors[key]
        pad = 100 * rng.standard_normal((rows - wte.shape[0], wte.shape[1]))
        tensors[key] = np.concatenate([wte, pad.astype(wte.dtype)])
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["vocab_size"] = rows
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def test_an_embedding_padded_beyond_its_tokenizer_imports(ref, tmp_path):
    """config.json's vocab_size 576 (embedding rows) for a 512-token tokenizer: transformers
    loads it, and so does jaxlab: the run's vocabulary is the tokenizer's, the embedding is cut
    to jaxlab's padded size (or keeps all 576 rows with vocab_pad_multiple=192: bit for bit),
    the logits over the 512 tokens are transformers', sampling never emits a padding id though
    the padding rows would win every argmax, and export writes the tokenizer's 512 rows."""
    padded = _padded_copy(ref, tmp_path, rows=576)
    np.save(tmp_path / "tokens.npy", ref.tokens)
    _reference(f"--hf_dir={padded}", f"--tokens={tmp_path / 'tokens.npy'}",
               f"--logits={tmp_path / 'logits.npy'}",
               f"--info={tmp_path / 'info.json'}")  # fmt: skip
    theirs = np.load(tmp_path / "logits.npy")
    assert theirs.shape == (3, 40, 576) and (theirs.argmax(-1) >= 512).all()
    assert json.loads((tmp_path / "info.json").read_text())["vocab_size"] == 512
    np.testing.assert_allclose(theirs[..., :512], ref.logits, atol=1e-5, rtol=0)

    cut = experiment.restore_run(importing.import_hf(padded, str(tmp_path / "cut")))
    assert cut.model.vocab_size == 512 and cut.params["wte"]["embedding"].shape == (512, 64)
    np.testing.assert_allclose(np.asarray(cut.model.apply({"params": cut.params}, ref.tokens)),
                               ref.logits, atol=1e-5, rtol=0)  # fmt: skip
    kept_dir = importing.import_hf(padded, str(tmp_path / "kept"), vocab_pad_multiple=192)
    kept = experiment.restore_run(kept_dir)
    embedding = np.asarray(kept.params["wte"]["embedding"])
    file_wte = load_file(os.path.join(padded, "model.safetensors"))["transformer.wte.weight"]
    assert kept.model.vocab_size == 512 and embedding.tobytes() == file_wte.tobytes()
    logits = np.asarray(kept.model.apply({"params": kept.params}, ref.tokens))
    assert logits.shape == (3, 40, 512)
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5, rtol=0)
    out = sampling.generate(kept.model, kept.params, ref.prompt, jax.random.key(0), 30,
                            temperature=1.0)  # fmt: skip
    assert int(np.asarray(out).max()) < 512
    greedy = sampling.generate(kept.model, kept.params, ref.prompt, jax.random.key(0),
                               GREEDY_TOKENS, temperature=0.0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(greedy), ref.generated)

    exported = exporting.export_hf(kept_dir, str(tmp_path / "exported"))
    with open(os.path.join(exported, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 512
    original = load_file(os.path.join(ref.hf_dir, "model.safetensors"))
    again = load_file(os.path.join(exported, "model.safetensors"))
    assert again["transformer.wte.weight"].tobytes() == original["transformer.wte.weight"].tobytes()


def test_finetuning_from_a_padded_hugging_face_directory_copies_everything(
    ref, shakespeare_tokens, tmp_path, monkeypatch, capsys
):
    """configs/gpt2_finetune.py on the padded directory: the run's vocabulary is the
    tokenizer's 512 (read from the directory without importing), and every parameter is copied
    (the embedding's token rows; the padding is not the tokenizer's)."""
    from configs import gpt2_finetune

    monkeypatch.setenv("JAXLAB_HF_CACHE", str(tmp_path / "cache"))
    padded = _padded_copy(ref, tmp_path, rows=576)
    assert gpt2_finetune.get_config(padded).model.vocab_size == 512
    run, state = _finetune_run(ref, padded, shakespeare_tokens)
    out = capsys.readouterr().out
    assert "the embedding has 576 rows for the tokenizer's 512 tokens" in out, out
    assert f"copied {len(jax.tree.leaves(state.params))} parameter arrays; re-initialised 0" in out
    logits = np.asarray(run.model.apply({"params": state.params}, ref.tokens))
    np.testing.assert_allclose(logits, ref.logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


def _broken_copy(ref, tmp_path, edit=None, remove=()) -> str:
    target = tmp_path / "broken"
    shutil.copytree(ref.hf_dir, target)
    for name in remove:
        os.remove(target / name)
    if edit:
        config = json.loads((target / "config.json").read_text())
        config.update(edit)
        (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize(
    "edit, remove, message",
    [
        (None, ("config.json",), r"config.json not found; a Hugging Face GPT-2 directory"),
        (None, ("model.safetensors",), r"model.safetensors not found"),
        (None, ("tokenizer.json",), r"has no tokenizer: neither tokenizer.json nor vocab.json"),
        ({"model_type": "llama"}, (), r"describes a 'llama' model .* only GPT-2"),
        ({"n_inner": 128}, (), r"model.safetensors: h.0.mlp.c_fc.bias has shape \(256,\), but "
                               r".*config.json .* makes it \(128,\)"),
        ({"vocab_size": 500}, (), r"tokenizer.json has 512 tokens but .*config.json .* "
                                  r"vocab_size=500"),
        ({"tie_word_embeddings": False}, (), r"tie_word_embeddings=False: an output layer"),
    ],
    ids=["no-config", "no-weights", "no-tokenizer", "not-gpt2", "shape", "tokenizer-size",
         "untied"],
)  # fmt: skip
def test_bad_hugging_face_directories_are_refused(ref, tmp_path, edit, remove, message):
    """Each broken directory gives an HFConvertError naming the file and the fix, and writes no
    workdir."""
    broken = _broken_copy(ref, tmp_path, edit, remove)
    with pytest.raises(gpt2_files.HFConvertError, match=message) as error:
        importing.import_hf(broken, str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")


def test_finetune_config_refuses_what_it_cannot_name_without_importing(ref, tmp_path):
    """configs/gpt2_finetune.py on a directory that is not a usable GPT-2 (another model type),
    or whose tokenizer is only vocab.json + merges.txt (no file to name as the run's tokenizer),
    refuses in one line naming the fix, and writes nothing."""
    from configs import gpt2_finetune

    cases = [
        (_broken_copy(ref, tmp_path / "llama", edit={"model_type": "llama"}),
         "describes a 'llama' model"),
        (_broken_copy(ref, tmp_path / "legacy", remove=("tokenizer.json",)),
         "has no tokenizer.json for the run to tokenize its data with; import it first"),
    ]  # fmt: skip
    for hf_dir, message in cases:
        with pytest.raises(gpt2_files.HFConvertError, match=message) as error:
            gpt2_finetune.get_config(hf_dir)
        assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["legacy", "llama"]


def test_command_line_errors_are_one_line(ref, trained_lm_run, tmp_path):
    """From the command line: a missing directory, and exporting a run with a character
    tokenizer, end in one ERROR line and exit status 1. Importing into a workdir that holds a
    run is refused."""
    with pytest.raises(workdir_files.WorkdirError, match="already holds a run"):
        importing.import_hf(ref.hf_dir, ref.workdir)
    commands = [
        ["import", f"--hf_dir={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'w'}"],
        ["export", f"--workdir={trained_lm_run}", f"--hf_dir={tmp_path / 'hf'}"],
    ]
    expected = ["is not a directory", "its tokenizer is char tokenizer"]
    for args, text in zip(commands, expected, strict=True):
        result = subprocess.run([sys.executable, "-m", "tools.hf_convert", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 1, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
        assert len(errors) == 1 and text in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"position_embedding": "rope"}, "position_embedding='rope'"),
        ({"tie_embeddings": False}, "tie_embeddings=False"),
        ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
        ({"mlp_activation": "swiglu"}, "mlp_activation='swiglu'"),
        ({"mlp_activation": "relu2"}, "mlp_activation='relu2'"),
        ({"num_kv_heads": 1}, "num_kv_heads=1"),
        ({"qk_norm": True}, "qk_norm=True"),
        ({"attn_logit_softcap": 30.0}, "attn_logit_softcap"),
        ({"use_bias": False}, "use_bias=False"),
    ],
)  # fmt: skip
def test_models_gpt2_cannot_express_are_refused(ref, fields, reason):
    """Every variant outside GPT-2's architecture is named as the reason for refusing export;
    GPT-2 itself (exact or tanh GELU) has none."""
    bpe = tokenization.load_tokenizer(ref.workdir)
    base = dict(num_layers=1, num_heads=2, embed_dim=16, vocab_size=bpe.vocab_size)
    assert gpt2_layout.gpt2_refusals(gpt.GPT(**base), bpe) == []
    assert gpt2_layout.gpt2_refusals(gpt.GPT(**base, mlp_activation="gelu_tanh"), bpe) == []
    reasons = gpt2_layout.gpt2_refusals(gpt.GPT(**base, **fields), bpe)
    assert len(reasons) == 1 and reason in reasons[0], reasons
