"""Packed documents (config.packing): windows carry segment ids, per-document positions and
target weights from the shards' end-of-text separators (data/text_windows.py), the GPT attends
only inside a document (block-diagonal causal), rotary and learned positions restart per
document, the loss skips the target across a boundary, evaluation windows are fixed, a resumed
packed run is bitwise the uninterrupted one, and a corpus without separators is refused."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from data import prepare, text_windows, tokenization
from models.gpt import GPT

TINY = dict(vocab_size=13, block_size=16, num_layers=2, num_heads=2, embed_dim=16)
DOCUMENTS = (5, 7, 4)  # lengths of the documents packed into one window of 16


def test_packed_fields_follow_the_separators() -> None:
    """The separator ends (and belongs to) its document; positions restart after it; the
    target after a separator (the next document's first token) has weight 0."""
    windows = np.array([[5, 6, 0, 7, 8, 9, 0, 0, 3], [1, 2, 3, 4, 5, 6, 7, 8, 0]])
    fields = text_windows.packed_fields(windows, separator=0)
    assert fields["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 3], [1] * 8]
    assert fields["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))]
    assert fields["weights"].tolist() == [[1, 1, 0, 1, 1, 1, 0, 0], [1] * 8]
    assert fields["segment_ids"].dtype == fields["positions"].dtype == np.int32


def _packed_batch(lengths: tuple[int, ...] = DOCUMENTS) -> tuple[jax.Array, dict, list]:
    """Random tokens of documents of `lengths` packed into one row, their segment ids and
    positions, and each document's slice."""
    tokens = jax.random.randint(jax.random.key(2), (1, sum(lengths)), 0, TINY["vocab_size"])
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    ends = np.cumsum(lengths)
    slices = [slice(end - n, end) for n, end in zip(lengths, ends, strict=True)]
    packed = {"segment_ids": jnp.asarray(segment_ids[None], jnp.int32),
              "positions": jnp.asarray(positions[None], jnp.int32)}  # fmt: skip
    return tokens, packed, slices


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_each_packed_document_gives_its_logits_alone(position_embedding: str) -> None:
    """A window of three packed documents: each document's logits equal the document run
    alone (attention does not cross a boundary; positions restart per document)."""
    model = GPT(**TINY, position_embedding=position_embedding, num_kv_heads=1)
    tokens, packed, slices = _packed_batch()
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    apply = jax.jit(lambda t, **kw: model.apply({"params": params}, t, **kw))
    logits = apply(tokens, **packed)
    for s in slices:
        alone = apply(tokens[:, s])
        np.testing.assert_allclose(logits[:, s], alone, rtol=1e-5, atol=1e-5)
    # Unpacked, the later documents see the earlier ones: different logits.
    assert not np.allclose(apply(tokens)[:, slices[1]], logits[:, slices[1]], atol=1e-3)


def test_the_attention_mask_is_causal_and_block_diagonal() -> None:
    """Changing the token at position s changes exactly the logits at positions t >= s of
    s's own document (and those at s itself)."""
    model = GPT(**TINY, position_embedding="rope")
    tokens, packed, _ = _packed_batch()
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    length = tokens.shape[1]
    variants = jnp.tile(tokens, (length, 1))
    variants = variants.at[jnp.arange(length), jnp.arange(length)].set(
        (tokens[0] + 1) % TINY["vocab_size"]
    )
    batch = {k: jnp.tile(v, (length, 1)) for k, v in packed.items()}
    apply = jax.jit(lambda t, **kw: model.apply({"params": params}, t, **kw))
    base, changed = apply(tokens, **packed)[0], apply(variants, **batch)
    moved = np.asarray(jnp.abs(changed - base[None]).max(axis=-1) > 1e-6)  # [s, t]
    segment = np.asarray(packed["segment_ids"][0])
    s, t = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    expected = (t >= s) & (segment[s] == segment[t])
    np.testing.assert_array_equal(moved, expected)


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory) -> str:
    """Many short documents (JSON Lines) prepared with a small BPE that has <|endoftext|>."""
    tmp = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(0)
    words = ["the", "king", "and", "thou", "art", "my", "lord", "speak", "to", "me", "of", "love"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(3, 30)))})
             for _ in range(600)]  # fmt: skip
    source = tmp / "docs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = str(tmp / "prepared")
    prepare.prepare(str(source), "bpe", out, vocab_size=300, progress=False)
    return out


def test_packed_windows_carry_the_documents_of_the_stream(documents_dir: str) -> None:
    """Packed batches are the plain stream's windows plus their documents: segments advance
    after each separator, positions restart there, the separator's target is unweighted; the
    evaluation windows are the same at every call and in every new reader (run)."""
    plain = text_windows.TextSplits(documents_dir, 32)
    packed = text_windows.TextSplits(documents_dir, 32, packing=True)
    eot = tokenization.load_tokenizer(documents_dir).eot_id
    assert eot is not None and packed.separator == eot
    batch = packed.batch("train", seed=1, index=3, global_batch=8)
    same = plain.batch("train", seed=1, index=3, global_batch=8)
    np.testing.assert_array_equal(batch["inputs"], same["inputs"])
    np.testing.assert_array_equal(batch["targets"], same["targets"])
    ends = batch["inputs"] == eot
    assert ends.any()  # short documents: several per window
    np.testing.assert_array_equal(batch["weights"] == 0, ends)
    steps = np.diff(batch["segment_ids"], axis=1)
    np.testing.assert_array_equal(steps, ends[:, :-1].astype(np.int32))
    restart = np.concatenate([np.ones((8, 1), bool), ends[:, :-1]], axis=1)
    assert (batch["positions"][restart] == 0).all()
    assert (np.diff(batch["positions"], axis=1)[~restart[:, 1:]] == 1).all()
    first = list(packed.eval_batches("val", seed=0, global_batch=8, steps=2))
    again = text_windows.TextSplits(documents_dir, 32, packing=True)
    for a, b in zip(first, again.eval_batches("val", seed=0, global_batch=8, steps=2), strict=True):
        assert sorted(a) == sorted(b) and "segment_ids" in a
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def _packed_config(dataset: str):
    from configs import shakespeare_char_cpu

    config = shakespeare_char_cpu.get_config()
    config.dataset = dataset
    config.tokenizer = "bpe"
    config.packing = True
    config.model.update(
        {"num_layers": 1, "num_heads": 2, "embed_dim": 32, "block_size": 32,
         "position_embedding": "rope"}
    )  # fmt: skip
    config.batch_size = config.eval_batch_size = 8
    config.num_train_steps = 4
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.eval_steps = 1
    config.checkpoint_every_steps = 2
    config.sample_every_eval = False
    config.async_checkpointing = False
    return config


def _train_losses(workdir: str) -> list[float]:
    from runtime import metrics_writer

    rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_resuming_a_packed_run_is_bitwise_the_uninterrupted_run(documents_dir, tmp_path) -> None:
    """4 packed steps at once, and 2 steps then a resumed 2: the same losses (which skip the
    boundary targets) and bitwise the same saved state."""
    import checkpointing
    import train

    config = _packed_config(documents_dir)
    whole = str(tmp_path / "whole")
    train.train_and_evaluate(config, whole)
    parts = str(tmp_path / "parts")
    config.num_train_steps = 2
    train.train_and_evaluate(config, parts)
    config.num_train_steps = 4
    train.train_and_evaluate(config, parts)
    a, step_a = checkpointing.read_state_as_numpy(whole)
    b, step_b = checkpointing.read_state_as_numpy(parts)
    assert step_a == step_b == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    losses = _train_losses(whole)
    assert losses == _train_losses(parts)
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_packing_without_document_separators_is_refused(tiny_corpus, tmp_path) -> None:
    """A character corpus has no end-of-text token: config.packing is one ConfigError naming
    the field and the fix, before anything compiles."""
    import config_validation
    import experiment

    config = _packed_config(tiny_corpus)
    config.tokenizer = "char"
    with pytest.raises(config_validation.ConfigError, match="config.packing=True needs"):
        experiment.build_run(config)
    config.dataset = "synthetic"
    with pytest.raises(config_validation.ConfigError, match="config.packing=False"):
        experiment.build_run(config)


def test_kjv_chapters_cuts_the_verses_into_chapters_verbatim() -> None:
    """scripts/kjv_chapters.py (the packing ablation's corpus): one document per book and
    chapter, its verse lines verbatim, so the documents joined are the text; a line that is not a
    verse is refused, naming it."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "kjv_chapters.py")
    spec = importlib.util.spec_from_file_location("kjv_chapters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Ge1:1 In the beginning\nGe1:2 And the earth\nGe2:1 Thus\n1Co13:4 Charity\n"
    chapters = module.chapters(text)
    assert chapters == ["Ge1:1 In the beginning\nGe1:2 And the earth\n", "Ge2:1 Thus\n",
                        "1Co13:4 Charity\n"]  # fmt: skip
    assert "".join(chapters) == text
    with pytest.raises(ValueError, match="line 2 is not a verse"):
        module.chapters("Ge1:1 a\nnot a verse\n")
