"""Tests for serve.py and serving/: real server processes on 127.0.0.1 (a tiny character GPT and
a tiny MLP, trained first) answer as sample.py and evaluate.py do (the log-probabilities of
an echoed prompt are evaluate.py's losses), batch requests without changing any request's
text, stream the same text, accept the neutral values clients send, refuse bad input (and
values they cannot honour) with a 4xx naming the field and keep serving, shed overload with
503, compile nothing after warm-up, and finish in-flight requests on SIGTERM. The per-slot
sampling underneath (serving/slots.py) is checked against sampling.py's own functions."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import httpx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

import models
import sampling
from models import gpt
from models.gpt import GPT
from serving import slots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 32  # the tiny GPT's context (conftest's tiny LM config)


# ----- slot decoding (serving/slots.py), no server


def test_buckets_and_room() -> None:
    """Prompt buckets are the powers of two below the context, then the context; a prompt of
    p tokens leaves room for block - p + 1 new tokens (the KV cache's limit)."""
    assert slots.prompt_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert slots.prompt_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert slots.bucket_for(5, 64) == 8 and slots.bucket_for(33, 48) == 48
    assert slots.max_slot_tokens(1, 64) == 64 and slots.max_slot_tokens(64, 64) == 1
    with pytest.raises(ValueError, match="prompt length"):
        slots.bucket_for(65, 64)


def test_per_row_sampling_equals_sample_logits() -> None:
    """Each row of sample_logits_per_row is the token sample_logits draws for that row alone
    with the same key and settings (greedy, temperature, top-k, nucleus, and their mixes)."""
    vocab = 11
    logits = jax.random.normal(jax.random.key(0), (7, vocab)) * 3
    keys = jax.random.split(jax.random.key(1), 7)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.9, 4, 0.8),
                (1.0, vocab, 1.0), (2.0, 1, 0.3)]  # fmt: skip
    temperature, top_k, top_p = (np.array(c) for c in zip(*settings, strict=True))
    for draw in range(2):
        keys = jax.random.split(keys[0], 7)
        rows = slots.sample_logits_per_row(
            logits, keys, temperature.astype(np.float32), top_k.astype(np.int32),
            top_p.astype(np.float32),
        )  # fmt: skip
        for i, (t, k, p) in enumerate(settings):
            alone = sampling.sample_logits(logits[i : i + 1], keys[i], t, k or None, p)
            assert int(rows[i]) == int(alone[0]), (draw, i, settings[i])
    # No row filtering (the sorts are skipped): still each row's own draw.
    unfiltered = slots.sample_logits_per_row(
        logits, keys, temperature.astype(np.float32), np.zeros(7, np.int32), np.ones(7, np.float32)
    )
    for i, t in enumerate(temperature):
        alone = sampling.sample_logits(logits[i : i + 1], keys[i], float(t))
        assert int(unfiltered[i]) == int(alone[0]), i


def test_slots_joining_between_steps_decode_as_generate_alone() -> None:
    """Slots with their own prompts, seeds and settings, one joining after two steps
    (continuous batching) and one reusing a slot that was decoded to the end of the context and
    then parked, each produce exactly sampling.generate's tokens for its prompt alone with its
    seed; parked slots do not disturb the others."""
    block = 16
    model = GPT(vocab_size=13, block_size=block, num_layers=2, num_heads=2, embed_dim=16)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, block), jnp.int32))
    params = nn.unbox(params)["params"]
    # prompt, temperature, top_k, top_p, seed
    requests = {0: ([1, 2, 3], 0.0, 0, 1.0, 0), 2: ([4, 5, 6, 7, 8], 1.0, 5, 0.9, 7),
                3: ([9], 0.8, 0, 1.0, 3), 1: ([5], 0.0, 0, 1.0, 0)}  # fmt: skip
    num_slots, n = 4, 9
    cache = slots.init_slot_cache(model, num_slots)
    names = ["tokens", "index", "seed", "t", "k", "p"]
    dtypes = [np.int32, np.int32, np.uint32, np.float32, np.int32, np.float32]
    host = {name: np.zeros(num_slots, dtype) for name, dtype in zip(names, dtypes, strict=True)}
    active = np.zeros(num_slots, bool)
    out: dict[int, list[int]] = {}

    def join(slot: int, request: tuple) -> None:
        nonlocal cache
        prompt, t, k, p, seed = request
        padded = np.zeros((1, slots.bucket_for(len(prompt), block)), np.int32)
        padded[0, : len(prompt)] = prompt
        token, cache = slots.prefill_slot(
            model, params, cache, np.int32(slot), padded, np.int32(len(prompt)),
            np.uint32(seed), np.float32(t), np.int32(k), np.float32(p),
        )  # fmt: skip
        for name, value in zip(names, [int(token), 0, seed, t, k, p], strict=True):
            host[name][slot] = value
        active[slot] = True
        out[slot] = [int(token)]

    def step() -> None:
        nonlocal cache
        tokens, cache = slots.decode_slots(
            model, params, cache, host["tokens"], host["index"] + 1, host["seed"], host["t"],
            host["k"], host["p"], active,
        )  # fmt: skip
        host["index"] += 1
        host["tokens"] = np.asarray(tokens).copy()
        for slot in np.flatnonzero(active):
            out[int(slot)].append(int(tokens[slot]))

    join(1, ([2], 1.0, 0, 1.0, 5))  # to the end of the context: cache index 16, then parked
    for _ in range(block - 1):
        step()
    active[1] = False
    join(0, requests[0])
    join(2, requests[2])
    for i in range(n + 2):
        if i == 2:
            join(3, requests[3])
        if i == 3:
            join(1, requests[1])
        step()
    for slot, (prompt, t, k, p, seed) in requests.items():
        alone = sampling.generate(model, params, jnp.array([prompt]), jax.random.key(seed), n,
                                  t, k or None, p)  # fmt: skip
        assert out[slot][:n] == np.asarray(alone[0, len(prompt) :]).tolist(), slot


# ----- real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py in a subprocess on a free port of 127.0.0.1, its output in a log file."""

    def __init__(self, workdir: str, log_path: str, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "serve.py", f"--workdir={workdir}", f"--port={port}", *flags],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not get ready in 240 s:\n" + self.log())

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=10).json()

    def post(self, path: str, body, timeout: float = 60) -> httpx.Response:
        kwargs = {"json": body}
        if isinstance(body, str):  # raw text, possibly not JSON at all
            kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
        return httpx.post(self.url + path, timeout=timeout, **kwargs)

    def complete(self, **body) -> dict:
        response = self.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def lm_run(tiny_corpus, tmp_path_factory) -> str:
    """A 1-layer character GPT (block 32) trained 150 steps: enough that greedy text is words."""
    from conftest import _tiny_lm_config

    import train

    config = _tiny_lm_config(tiny_corpus)
    config.num_train_steps = config.decay_steps = 150
    config.eval_every_steps = config.checkpoint_every_steps = 150
    config.log_every_steps = 50
    workdir = str(tmp_path_factory.mktemp("serve_lm"))
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def lm_server(lm_run, tmp_path_factory):
    """serve.py on the tiny GPT: 4 slots, at most 32 sequences waiting."""
    log = str(tmp_path_factory.mktemp("serve_lm_log") / "server.log")
    server = Server(lm_run, log, "--max_batch_size=4", "--max_queue=32")
    yield server
    server.stop()


def _sample_py(workdir: str, prompt: str, max_new_tokens: int) -> str:
    """sample.py's greedy continuation of `prompt` (the whole text, prompt included)."""
    result = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={workdir}", f"--prompt={prompt}",
         "--num_samples=1", f"--max_new_tokens={max_new_tokens}", "--temperature=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    body = result.stdout[: result.stdout.index("\n----------\ncompile")]
    return re.split(r"^---------- sample 0 ----------\n", body, flags=re.M)[1]


def test_greedy_completion_equals_sample_py(lm_run, lm_server) -> None:
    """temperature 0: the server's text is sample.py's greedy continuation, character for
    character; usage counts the tokens."""
    # 12 tokens: padded to the 16-token bucket. sample.py compiles afresh: one call.
    for prompt, max_tokens in [("The king and", 20)]:
        expected = _sample_py(lm_run, prompt, max_tokens)
        reply = lm_server.complete(prompt=prompt, max_tokens=max_tokens, temperature=0)
        (choice,) = reply["choices"]
        assert prompt + choice["text"] == expected
        assert choice["finish_reason"] == "length"
        assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                                  "total_tokens": len(prompt) + max_tokens}  # fmt: skip
    assert len(set(expected[len(prompt) :])) > 2, "greedy text should be more than one letter"


REQUESTS = [
    dict(prompt="The king", max_tokens=25, temperature=0.9, seed=1),
    dict(prompt="Thou", max_tokens=20, temperature=1.2, top_k=5, seed=2),
    dict(prompt="My lord", max_tokens=24, temperature=0.8, top_p=0.7, seed=3),
    dict(prompt="And", max_tokens=30, temperature=0, seed=4),
    dict(prompt="Speak to me of love", max_tokens=10, temperature=1.0, top_k=3, top_p=0.9, seed=5),
    dict(prompt="O", max_tokens=28, temperature=1.0, seed=6),
]


def test_batched_requests_get_the_text_they_get_alone(lm_server) -> None:
    """Requests with different prompts, lengths, settings and seeds sent together (decoded in
    shared steps: fewer steps than tokens) get exactly the text each gets alone; choice i of
    a multi-prompt, n > 1 request is the text of seed + i alone."""
    alone = [lm_server.complete(**r)["choices"][0]["text"] for r in REQUESTS]
    before = lm_server.health()
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda r: lm_server.complete(**r), REQUESTS))
    after = lm_server.health()
    assert [r["choices"][0]["text"] for r in together] == alone
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert tokens == sum(r["max_tokens"] for r in REQUESTS)
    assert after["decode_steps"] - before["decode_steps"] < tokens - len(REQUESTS)  # batched

    reply = lm_server.complete(prompt=["The king", "Thou"], n=2, max_tokens=15,
                               temperature=1.0, seed=40)  # fmt: skip
    texts = [c["text"] for c in sorted(reply["choices"], key=lambda c: c["index"])]
    prompts = ["The king"] * 2 + ["Thou"] * 2
    expected = [
        lm_server.complete(prompt=p, max_tokens=15, temperature=1.0, seed=40 + i)["choices"][0]
        for i, p in enumerate(prompts)
    ]
    expected = [c["text"] for c in expected]
    assert texts == expected
    assert texts[0] != texts[1], "two choices of one prompt draw with different seeds"


def _stream(server: Server, **body) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """Streams a completion: (text per choice, finish reason per choice, every event)."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        event = json.loads(line[len("data: ") :])
        events.append(event)
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"] is not None:
                assert choice["index"] not in finish, "one finish_reason per choice"
                finish[choice["index"]] = choice["finish_reason"]
    return texts, finish, events


def test_streaming_yields_the_non_streaming_text(lm_server) -> None:
    """Server-sent events carry the same text, piece by piece, and each choice's finish
    reason; include_usage adds the token counts at the end."""
    body = dict(prompt=["The king", "My"], n=2, max_tokens=20, temperature=0.9, seed=11)
    reply = lm_server.complete(**body)
    texts, finish, events = _stream(lm_server, **body, stream_options={"include_usage": True})
    assert texts == {c["index"]: c["text"] for c in reply["choices"]}
    assert finish == {i: "length" for i in range(4)}
    assert len(events) > 4 * 3, "the text arrives in pieces"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == reply["usage"]


def test_stop_strings_end_the_text(lm_server) -> None:
    """A stop string ends a choice before it, with finish_reason 'stop', streamed or not."""
    text = lm_server.complete(prompt="The king", max_tokens=24, temperature=0)["choices"][0]
    stop = text["text"][6:8]
    expected = text["text"][: text["text"].index(stop)]
    body = dict(prompt="The king", max_tokens=24, temperature=0, stop=["zz", stop])
    choice = lm_server.complete(**body)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (expected, "stop")
    texts, finish, _ = _stream(lm_server, **body)
    assert (texts[0], finish[0]) == (expected, "stop")


BAD_COMPLETIONS = [
    ('{"prompt": "The", ', 400, "body"),  # malformed JSON
    ("[1, 2]", 400, "body"),
    ('{"prompt": "The", "max_token": 5}', 400, "max_token"),  # unknown (misspelt) field
    ('{"prompt": "The Zq!"}', 400, "prompt"),  # characters outside the vocabulary
    ('{"prompt": ["The", "Zq"]}', 400, "prompt"),
    ('{"prompt": ""}', 400, "prompt"),
    ('{"prompt": []}', 400, "prompt"),
    ('{"prompt": 5}', 400, "prompt"),
    ('{"max_tokens": 5}', 400, "prompt"),  # missing
    ('{"prompt": "The", "max_tokens": 31}', 400, "max_tokens"),  # past the context (30 fit)
    ('{"prompt": "' + "the " * 9 + '"}', 400, "prompt"),  # 36 tokens: longer than the context
    ('{"prompt": "The", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "The", "max_tokens": "5"}', 400, "max_tokens"),
    ('{"prompt": "The", "temperature": -0.5}', 400, "temperature"),
    ('{"prompt": "The", "top_p": 0}', 400, "top_p"),
    ('{"prompt": "The", "top_p": 1.01}', 400, "top_p"),
    ('{"prompt": "The", "top_k": -1}', 400, "top_k"),
    ('{"prompt": "The", "n": 0}', 400, "n"),
    ('{"prompt": ["a", "b", "c"], "n": 16}', 400, "n"),  # 48 sequences > the queue
    ('{"prompt": "The", "seed": -3}', 400, "seed"),
    ('{"prompt": "The", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ('{"prompt": "The", "stream": "yes"}', 400, "stream"),
    ('{"prompt": "The", "model": "gpt-4"}', 404, "model"),
    # values the server cannot honour: refused with the reason, never ignored
    ('{"prompt": "The", "presence_penalty": 0.5}', 400, "presence_penalty"),
    ('{"prompt": "The", "frequency_penalty": -1}', 400, "frequency_penalty"),
    ('{"prompt": "The", "best_of": 3}', 400, "best_of"),
    ('{"prompt": "The", "logit_bias": {"3": 5.0}}', 400, "logit_bias"),
    ('{"prompt": "The", "suffix": "king"}', 400, "suffix"),
    ('{"prompt": "The", "logprobs": 6}', 400, "logprobs"),  # OpenAI's limit is 5
    ('{"prompt": "The", "logprobs": 1, "stream": true}', 400, "logprobs"),
    ('{"prompt": "The", "echo": true, "stream": true}', 400, "echo"),
    ('{"prompt": [3, 5000]}', 400, "prompt"),  # a token id outside the vocabulary
    ('{"prompt": [[3, 4], []]}', 400, "prompt"),
    ('{"prompt": [3, "a"]}', 400, "prompt"),
    ('{"prompt": "The", "max_tokens": 0, "echo": false}', 400, "max_tokens"),
]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    BAD_COMPLETIONS,
    ids=[f"{i}-{field}" for i, (_, _, field) in enumerate(BAD_COMPLETIONS)],
)
def test_bad_completion_requests_get_a_4xx_naming_the_field(lm_server, body, status, field):
    """Each bad request gets its 4xx with an OpenAI-style error whose param and message name
    the field; the server then still answers."""
    response = lm_server.post("/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert "\n" not in error["message"]
    assert lm_server.complete(prompt="The", max_tokens=2)["choices"][0]["finish_reason"]


NEUTRAL = dict(presence_penalty=0, frequency_penalty=0.0, best_of=1, user="someone",
               logprobs=None, max_tokens=None, echo=False, logit_bias={}, suffix=None,
               stop=None, top_p=None, stream=None)  # fmt: skip


def test_neutral_values_are_accepted(lm_server) -> None:
    """The values OpenAI's clients send that change nothing (LangChain always sends the two
    penalties; nulls for unset fields) are accepted, each alone and all together, and the text
    is what the request gets without them (null max_tokens: the default, 16)."""
    base = dict(prompt="The king", temperature=0.7, seed=3)
    expected = lm_server.complete(**base)["choices"][0]["text"]
    assert len(expected) == 16
    for field, value in NEUTRAL.items():
        reply = lm_server.complete(**{**base, field: value})
        assert reply["choices"][0]["text"] == expected, field
    reply = lm_server.complete(**{**base, **NEUTRAL})
    assert reply["choices"][0]["text"] == expected
    assert lm_server.complete(**base, n=2, best_of=2)["choices"][0]["text"] == expected
    assert len(lm_server.complete(prompt="The", seed=None)["choices"][0]["text"]) == 16


def _per_token_losses(workdir: str, ids: np.ndarray) -> np.ndarray:
    """evaluate.py's per-token losses of ids[1:] given the tokens before each: the eval step's
    summed loss (evaluation.eval_sums, the loop evaluate.py runs) over each prefix, differenced.
    """
    import evaluation
    import experiment

    restored = experiment.restore_run(workdir)
    sums = [0.0]
    for k in range(2, len(ids) + 1):
        batch = {"inputs": ids[None, : k - 1], "targets": ids[None, 1:k],
                 "mask": np.ones(1, np.float32)}  # fmt: skip
        sums.append(float(evaluation.eval_sums(restored.run, restored.state, [batch])["loss_sum"]))
    return np.diff(sums)


def test_echoed_prompt_logprobs_equal_evaluate_losses(lm_run, lm_server) -> None:
    """echo with max_tokens 0 returns the prompt and OpenAI's logprobs of it: each token's
    log-probability is minus evaluate.py's loss of that token on the same text (float32), the
    first token's is null, top_logprobs list the k most likely tokens (and the token itself),
    text_offset where each token starts. The same prompt as token ids gets the same answer."""
    from data import tokenization

    text = "The king and thou art my lord."
    ids = tokenization.load_tokenizer(lm_run).encode(text)
    reply = lm_server.complete(prompt=text, max_tokens=0, echo=True, logprobs=3)
    (choice,) = reply["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": len(text), "completion_tokens": 0,
                              "total_tokens": len(text)}  # fmt: skip
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list(text)
    assert logprobs["text_offset"] == list(range(len(text)))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    losses = _per_token_losses(lm_run, np.asarray(ids, np.int32))
    np.testing.assert_allclose(-np.array(logprobs["token_logprobs"][1:]), losses, atol=2e-5)
    for token, logprob, top in zip(text[1:], logprobs["token_logprobs"][1:],
                                   logprobs["top_logprobs"][1:], strict=True):  # fmt: skip
        assert 3 <= len(top) <= 4 and top[token] == logprob
        assert max(top.values()) >= logprob
    as_ids = lm_server.complete(prompt=[int(i) for i in ids], max_tokens=0, echo=True, logprobs=3)
    assert as_ids["choices"][0]["logprobs"] == logprobs
    assert as_ids["choices"][0]["text"] == text


def test_generated_logprobs_score_the_text(lm_server) -> None:
    """logprobs without echo list the generated tokens: greedy tokens are each the most likely
    one, and their log-probabilities are those of the same text echoed and scored; with echo
    and one new token (lm-eval's loglikelihood request, token ids in a batch) the list is the
    prompt's tokens then the new one."""
    reply = lm_server.complete(prompt="The king", max_tokens=6, temperature=0, logprobs=1)
    (choice,) = reply["choices"]
    generated = choice["logprobs"]
    assert "".join(generated["tokens"]) == choice["text"]
    assert generated["text_offset"] == list(range(6))
    for token, logprob, top in zip(generated["tokens"], generated["token_logprobs"],
                                   generated["top_logprobs"], strict=True):  # fmt: skip
        assert top[token] == logprob == max(top.values())
    scored = lm_server.complete(prompt="The king" + choice["text"], max_tokens=0, echo=True,
                                logprobs=1)["choices"][0]["logprobs"]  # fmt: skip
    assert scored["token_logprobs"][-6:] == generated["token_logprobs"]
    prompts = [[20, 10, 7, 1], [5, 6]]
    reply = lm_server.complete(prompt=prompts, max_tokens=1, temperature=0, logprobs=1,
                               echo=True, seed=1234)  # fmt: skip
    for prompt, choice in zip(prompts, reply["choices"], strict=True):
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + 1


def test_wrong_routes_and_tasks_are_4xx(lm_server) -> None:
    """A classify request to a language model, an unknown path and a wrong method are 4xx
    JSON errors."""
    response = lm_server.post("/v1/classify", {"images": [[0]]})
    assert response.status_code == 404 and "/v1/completions" in response.json()["error"]["message"]
    assert httpx.get(lm_server.url + "/v1/nothing").status_code == 404
    assert httpx.get(lm_server.url + "/v1/completions").status_code == 405
    response = httpx.post(lm_server.url + "/v1/completions", content="prompt=The")
    assert response.status_code == 400 and "Content-Type" in response.json()["error"]["message"]
    assert lm_server.health()["status"] == "ready"


def test_models_endpoint_describes_the_run(lm_server) -> None:
    """/v1/models: the run's id, step, parameter count, context and config."""
    (entry,) = httpx.get(lm_server.url + "/v1/models").json()["data"]
    assert entry["step"] == 150 and entry["task"] == "lm" and entry["block_size"] == BLOCK
    assert entry["config"]["model"]["num_layers"] == 1
    model = models.build_model(ml_collections.ConfigDict(entry["config"]))
    assert entry["num_params"] == gpt.num_params(model) > 10_000
    # GET /v1/models/{id}: the same entry (the openai client's models.retrieve), 404 otherwise.
    response = httpx.get(lm_server.url + f"/v1/models/{entry['id']}")
    assert response.status_code == 200 and response.json() == entry
    response = httpx.get(lm_server.url + "/v1/models/gpt-4")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_chat_without_a_template_says_why(lm_server) -> None:
    """A run without a chat template (a base model) answers chat with a 400 that says so and
    points to /v1/completions, not a bare 404."""
    body = {"messages": [{"role": "user", "content": "The king"}]}
    response = lm_server.post("/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "no chat template" in error["message"] and "/v1/completions" in error["message"]


def test_tokenizer_routes(lm_server) -> None:
    """/tokenizer_info, /tokenize and /detokenize (vLLM's, which lm-eval's remote tokenizer
    calls) use the run's tokenizer."""
    info = httpx.get(lm_server.url + "/tokenizer_info").json()
    assert info["eos_token"] is None and info["model_max_length"] == BLOCK
    tokens = lm_server.post("/tokenize", {"prompt": "The", "add_special_tokens": False}).json()
    assert tokens["count"] == 3
    text = lm_server.post("/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "The"
    assert lm_server.post("/tokenize", {"prompt": "Zq"}).status_code == 400


def test_overload_is_503_with_retry_after(lm_server) -> None:
    """Twelve clients at once, each asking for 32 sequences (the whole waiting line): those
    that find the line full get 503 and a Retry-After hint at once; the others complete, and
    the server answers afterwards."""
    body = dict(prompt=["T", "O"], n=16, max_tokens=BLOCK, temperature=1.0, seed=0)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: lm_server.post("/v1/completions", body), range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "overloaded" in response.json()["error"]["message"]
        else:
            assert len(response.json()["choices"]) == 32
    assert lm_server.complete(prompt="The", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_disconnected_stream_frees_its_slots(lm_server) -> None:
    """A client that leaves mid-stream frees its slots and its place in line: its remaining
    sequences are not generated."""
    before = lm_server.health()["generated_tokens"]
    body = dict(prompt=["T", "O"], n=16, max_tokens=BLOCK, temperature=1.0, stream=True)
    with httpx.stream("POST", lm_server.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 30
    while (health := lm_server.health())["active"] or health["waiting"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["generated_tokens"] - before < 32 * BLOCK / 2


def test_no_compilation_after_warm_up(lm_server) -> None:
    """Prompts of every bucket, n > 1, streaming and every sampling setting reuse the programs
    compiled at warm-up: the server counts no XLA compilation since it said ready."""
    for length in [1, 2, 3, 5, 9, 17, 31, 32]:
        prompt = ("the king and thou art my lord " * 2)[:length]
        lm_server.complete(prompt=prompt, max_tokens=1, temperature=0.5, top_k=3, top_p=0.5)
    lm_server.complete(prompt=["a", "kk"], n=3, max_tokens=4, temperature=0, seed=9)
    _stream(lm_server, prompt="Thou", max_tokens=6, temperature=2.0, top_k=40, stop="e")
    # Scoring (logprobs, echo): one program for every length and batch of prompts.
    for length in [1, 7, 32]:
        prompt = ("the king and thou art my lord " * 2)[:length]
        lm_server.complete(prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    lm_server.complete(prompt=[[1, 2], [3] * 20] * 6, max_tokens=3, logprobs=2)
    assert lm_server.health()["compilations_since_ready"] == 0


# ----- classification


def test_classification_admission_sheds_load_past_max_waiting(tmp_path) -> None:
    """Service.admit_classification holds one of max_waiting places for its block: with every
    place taken, the next request is refused at once (503, overloaded, nothing held), and a
    place frees when its block ends, by an exception too."""
    from serving.service import ApiError, Service

    spec = types.SimpleNamespace(example_input=np.zeros((1, 2, 2, 1), np.uint8), num_classes=3)
    restored = types.SimpleNamespace(
        config=types.SimpleNamespace(task="classification"),
        run=types.SimpleNamespace(input_spec=spec, mesh=types.SimpleNamespace(size=1)),
    )
    service = Service(restored, str(tmp_path), max_waiting=2)
    with service.admit_classification(), service.admit_classification():
        with pytest.raises(ApiError) as refused, service.admit_classification():
            pass
        assert (refused.value.status, refused.value.kind) == (503, "unavailable")
        assert refused.value.message == "overloaded: 2 requests are waiting; retry after 1 s"
    with pytest.raises(RuntimeError), service.admit_classification():
        raise RuntimeError("predict failed")
    with service.admit_classification(), service.admit_classification():
        pass  # both places are free again


@pytest.fixture(scope="module")
def test_images(trained_mlp_run) -> tuple[np.ndarray, np.ndarray]:
    """The first 8 Fashion-MNIST test images and evaluate.py's probabilities for them (the
    run's compiled predict step on the eval pipeline's first batch)."""
    import evaluation
    import experiment

    restored = experiment.restore_run(trained_mlp_run, load_data=True)
    batch = next(iter(restored.run.datasets.eval_batches("test")))
    log_probs, _ = evaluation.predict_log_probs(restored.run, restored.state, [batch])
    return np.asarray(batch["inputs"][:8]), np.exp(log_probs[:8])


@pytest.fixture(scope="module")
def mlp_server(trained_mlp_run, test_images, tmp_path_factory):
    """serve.py on the tiny Fashion-MNIST MLP (3 images per compiled call: requests span
    several calls)."""
    log = str(tmp_path_factory.mktemp("serve_mlp_log") / "server.log")
    server = Server(trained_mlp_run, log, "--classify_batch_size=3")
    yield server
    server.stop()


def _png(image: np.ndarray) -> str:
    """Base64 PNG of a uint8 image [H, W, 1] (grayscale) or [H, W, 3]."""
    from PIL import Image

    buffer = io.BytesIO()
    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_classify_equals_evaluate(mlp_server, test_images) -> None:
    """Images sent as nested lists ([28, 28, 1] and [28, 28]) and as PNG get evaluate.py's
    probabilities and predictions; top lists the most likely labels in order."""
    images, expected = test_images
    payload = [images[0].tolist(), images[1][..., 0].tolist(), images[2].tolist()]
    payload += [_png(im) for im in images[3:]]
    response = mlp_server.post("/v1/classify", {"images": payload, "top_k": 3})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    probs = np.array([d["probabilities"] for d in data])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert [d["label"] for d in data] == expected.argmax(-1).tolist()
    for d, p in zip(data, expected, strict=True):
        assert [t["label"] for t in d["top"]] == np.argsort(-p)[:3].tolist()
    assert mlp_server.health()["compilations_since_ready"] == 0


def test_bad_images_get_a_4xx_naming_the_image(mlp_server, test_images) -> None:
    """Wrong shapes, ragged or non-pixel values, bad base64, another format, a top_k beyond the
    classes and unknown fields are 400s naming the field; the server then still answers."""
    from PIL import Image

    good = test_images[0][0].tolist()
    jpeg = io.BytesIO()
    Image.fromarray(test_images[0][0][..., 0]).save(jpeg, format="JPEG")
    cases = [
        ({"images": [good, np.zeros((27, 28)).tolist()]}, "images[1]", "shape"),
        ({"images": [np.zeros((28, 28, 3)).tolist()]}, "images[0]", "shape"),
        ({"images": [[[0] * 28] * 27 + [[0] * 27]]}, "images[0]", "rectangular"),
        ({"images": [np.full((28, 28), 300).tolist()]}, "images[0]", "[0, 255]"),
        ({"images": [np.full((28, 28), 0.5).tolist()]}, "images[0]", "integers"),
        ({"images": [good, "not base64!"]}, "images[1]", "base64"),
        ({"images": [base64.b64encode(b"hello").decode()]}, "images[0]", "PNG"),
        ({"images": [base64.b64encode(jpeg.getvalue()).decode()]}, "images[0]", "PNG"),
        ({"images": [_png(np.zeros((14, 28, 1), np.uint8))]}, "images[0]", "shape"),
        ({"images": []}, "images", "images"),
        ({"images": [good], "top_k": 11}, "top_k", "10 classes"),
        ({"images": [good], "imgs": 1}, "imgs", "unknown field"),
    ]
    for body, field, words in cases:
        response = mlp_server.post("/v1/classify", body)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["param"] == field.split("[")[0] or error["param"] == field, error
        assert error["message"].startswith(field) and words in error["message"], error
    response = mlp_server.post("/v1/completions", {"prompt": "x"})
    assert response.status_code == 404
    assert mlp_server.post("/v1/classify", {"images": [good]}).status_code == 200


# ----- shutdown


def test_sigterm_finishes_in_flight_requests_then_exits(lm_run, tmp_path) -> None:
    """SIGTERM while requests are decoding and waiting: the server stops accepting
    connections, every request it already holds gets its whole completion, and the process
    exits with status 0. (A request still connecting at SIGTERM is refused, rightly.)"""
    # One slot and 8 choices a request: 12 requests are 96 sequences decoded one after another,
    # long enough (seconds) to see several held at once even on a busy machine.
    choices, requests = 8, 12
    server = Server(lm_run, str(tmp_path / "server.log"), "--max_batch_size=1", "--max_queue=128")
    try:
        body = dict(prompt="T", max_tokens=BLOCK, temperature=1.0, n=choices)
        done: list[float] = []
        # One client for all threads (and the health polls): no per-call client set-up.
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))

        def request(i: int) -> httpx.Response:
            response = client.post(server.url + "/v1/completions", json={**body, "seed": i})
            done.append(time.monotonic())
            return response

        def held() -> int:  # sequences decoding in the slot or waiting for it
            health = client.get(server.url + "/healthz").json()
            return health["active"] + health["waiting"]

        with concurrent.futures.ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(request, i) for i in range(requests)]
            deadline = time.monotonic() + 60
            held_at_signal = 0
            # Three requests' sequences held: at least two requests are wholly in line.
            while held_at_signal < 3 * choices:
                held_at_signal = held()
                assert time.monotonic() < deadline and len(done) < requests, (
                    "the server never held 3 requests at once"
                )
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            outcomes = [f.exception() or f.result() for f in futures]
        client.close()
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()
    responses = [o for o in outcomes if isinstance(o, httpx.Response)]
    refused = [o for o in outcomes if not isinstance(o, httpx.Response)]
    assert all(isinstance(o, httpx.TransportError) for o in refused), refused
    # The two waiting at the signal (at least) decoded after it, and every held one finished.
    assert sum(t > signalled for t in done) >= 2, "no request was in flight at SIGTERM"
    assert len(responses) * choices >= held_at_signal
    for response in responses:
        assert response.status_code == 200, response.text
        texts = response.json()["choices"]
        assert len(texts) == choices
        for choice in texts:
            assert len(choice["text"]) == BLOCK and choice["finish_reason"] == "length"
    assert "stopped: in-flight requests finished" in server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/healthz", timeout=5)
