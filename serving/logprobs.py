"""Log-probabilities of token sequences by a restored run's compiled forward pass, and their
OpenAI form: what `logprobs` and `echo` on /v1/completions return (serving/service.py) and what
the in-process lm-eval adapter (tools/lm_eval.py) scores with.

`Scorer.score` runs `steps.predict_step` (the run's forward pass, log-softmax in float32; the
function the run's compiled predict step wraps) under jit, sharded as the run is (the state as
restored, the rows split over the mesh's batch axes as `CompiledSteps.put_batch` places
evaluation batches), on a fixed shape [rows, block_size]: one compilation, at warm-up. Token t_i
of a sequence is scored given the tokens before it, at most the last block_size of them
(nanoGPT's definition, the one `sampling.generate` generates by): the first block_size + 1
tokens come from one row (a causal pass), each later token from a row of its own window.

`completion_logprobs` renders scores as OpenAI's legacy completions `logprobs` object (OpenAI
API reference, "Completions": `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import sharding
import steps
from runtime import distributed

# The most alternatives per position a request may ask for (`logprobs`; OpenAI's limit is 5).
MAX_LOGPROBS = 5
# What a log-probability of -inf is sent as (JSON has no infinity; vLLM sends the same).
LOGPROB_FLOOR = -9999.0


@dataclasses.dataclass
class Scores:
    """Scores of one sequence of L tokens. Position 0 (no context) holds NaN and -1."""

    logprobs: np.ndarray  # float32 [L]: log p(t_i | the (last block_size) tokens before it)
    top_ids: np.ndarray  # int32 [L, MAX_LOGPROBS]: the most likely tokens at i, most likely first
    top_logprobs: np.ndarray  # float32 [L, MAX_LOGPROBS]: their log-probabilities

    @property
    def greedy(self) -> np.ndarray:
        """bool [L]: t_i is the most likely token at i (False at position 0)."""
        out = np.zeros(len(self.logprobs), bool)
        out[1:] = self.logprobs[1:] >= self.top_logprobs[1:, 0]
        return out


def _score_rows(
    state: Any, batch: dict[str, jax.Array], *, model: nn.Module
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(targets) float32 [R, T], top log-probs float32 [R, T, K], their ids int32
    [R, T, K]) of the model on batch['inputs'] int32 [R, T] (targets int32 [R, T])."""
    log_probs = steps.predict_step(state, {"inputs": batch["inputs"]}, model=model)
    target = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(log_probs, MAX_LOGPROBS)
    return target, top_values, top_ids.astype(jnp.int32)


def _batch_shards(run: Any) -> int:
    """How many ways the mesh splits a batch's leading axis (data x fsdp, as the rules say)."""
    spec = nn.logical_to_mesh_axes(("batch",), run.rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(run.mesh.shape[a] for a in axes)


class Scorer:
    """Scores token sequences with a restored run (the module docstring). Thread-safe.

    Args:
      restored: experiment.restore_run's result (a language model).
      rows: windows per compiled call (rounded up to a multiple of the mesh's batch shards).
    """

    def __init__(self, restored: Any, rows: int = 8) -> None:
        self.run, self.state = restored.run, restored.state
        self.block_size = int(self.run.model.block_size)
        self.vocab_size = int(self.run.config.model.vocab_size)
        shards = _batch_shards(self.run)
        self.rows = -(-max(1, rows) // shards) * shards
        self._score = jax.jit(
            functools.partial(_score_rows, model=self.run.model),
            out_shardings=sharding.replicated(self.run.mesh),
        )
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Compiles (and runs once) the scoring program."""
        self.score([np.zeros(2, np.int32)])

    def score(self, sequences: list[np.ndarray]) -> list[Scores]:
        """`Scores` of each sequence (int token ids, at least 1 each, any length) in
        ceil(windows / rows) compiled calls. Raises ValueError for an empty sequence or an id
        outside the vocabulary."""
        block = self.block_size
        windows = []  # (sequence, first position scored, tokens, positions to read)
        for s, seq in enumerate(sequences):
            seq = np.asarray(seq, np.int64).reshape(-1)
            if seq.size == 0:
                raise ValueError("a sequence to score needs at least one token")
            if seq.min() < 0 or seq.max() >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
            head = min(seq.size, block + 1)
            if head > 1:  # t_1 .. t_{head-1} from one causal pass
                windows.append((s, 1, seq[:head], range(head - 1)))
            for i in range(block + 1, seq.size):  # each later token from its own window
                windows.append((s, i, seq[i - block : i + 1], range(block - 1, block)))
        out = []
        for seq in sequences:
            n = len(seq)
            out.append(Scores(np.full(n, np.nan, np.float32),
                              np.full((n, MAX_LOGPROBS), -1, np.int32),
                              np.full((n, MAX_LOGPROBS), np.nan, np.float32)))  # fmt: skip
        for start in range(0, len(windows), self.rows):
            chunk = windows[start : start + self.rows]
            inputs = np.zeros((self.rows, block), np.int32)
            targets = np.zeros((self.rows, block), np.int32)
            for r, (_, _, tokens, _) in enumerate(chunk):
                inputs[r, : len(tokens) - 1] = tokens[:-1]
                targets[r, : len(tokens) - 1] = tokens[1:]
            target, top_values, top_ids = self._call(inputs, targets)
            for r, (s, first, _, positions) in enumerate(chunk):
                for j, p in enumerate(positions):
                    # window position p predicts token `first + j` of the sequence
                    i = first + j
                    out[s].logprobs[i] = target[r, p]
                    out[s].top_ids[i] = top_ids[r, p]
                    out[s].top_logprobs[i] = top_values[r, p]
        return out

    def _call(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        compiled = self.run.compiled
        with self._lock, compiled.context():
            placed = compiled.put_batch({"inputs": inputs, "targets": targets})
            return distributed.to_host(self._score(self.state, placed))


# ----------------------------------------------------------------------------- OpenAI's form


def token_text(tokenizer: Any, token: int) -> str:
    """A token as text: its decoding alone (a byte-level token that is part of a multi-byte
    character decodes to U+FFFD; the end-of-text token to '<|endoftext|>')."""
    return tokenizer.decode(np.asarray([token], np.int32))


def text_offsets(tokenizer: Any, ids: np.ndarray) -> list[int]:
    """The character offset at which each token's text starts in decode(ids): the running
    length of the tokens' texts where they add up to the whole text (characters, bytes, most
    BPE), else the length of each prefix's decoding, without a trailing partial character."""
    ids = np.asarray(ids, np.int32)
    pieces = [token_text(tokenizer, int(t)) for t in ids]
    whole = tokenizer.decode(ids)
    if "".join(pieces) == whole:
        return [0, *np.cumsum([len(p) for p in pieces])[:-1].tolist()]
    offsets = [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    return [min(o, len(whole)) for o in offsets]


def _finite(x: float) -> float:
    return LOGPROB_FLOOR if not math.isfinite(x) else max(float(x), LOGPROB_FLOOR)


def completion_logprobs(
    tokenizer: Any, ids: np.ndarray, scores: Scores, first: int, k: int
) -> dict[str, list]:
    """OpenAI's completions `logprobs` of tokens ids[first:] (the echoed prompt and the
    generated tokens: first = 0; the generated ones only: first = prompt length).

    tokens: each token's text; token_logprobs: its log-probability (natural log, float32
    computed, null for the sequence's first token, which has no context); top_logprobs: the
    k most likely tokens at its position and the token itself, text -> log-probability (null
    at the first token); text_offset: where its text starts in the choice's text, counted in
    characters from the choice text's start (ids[first]'s own offset in decode(ids), 0 with
    echo). scores: `Scorer.score`'s of ids; k: alternatives per position (<= MAX_LOGPROBS).
    """
    offsets = text_offsets(tokenizer, ids)
    text_start = offsets[first] if 0 < first < len(ids) else 0
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}  # fmt: skip
    for i in range(first, len(ids)):
        token = token_text(tokenizer, int(ids[i]))
        out["tokens"].append(token)
        out["text_offset"].append(max(0, offsets[i] - text_start))
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        logprob = _finite(scores.logprobs[i])
        top = {}
        for t, v in zip(scores.top_ids[i, :k], scores.top_logprobs[i, :k], strict=True):
            top.setdefault(token_text(tokenizer, int(t)), _finite(v))
        top.setdefault(token, logprob)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
    return out
