"""lm-eval's loglikelihood throughput on a run: in process against through serve.py.

    python scripts/lm_eval_throughput.py --workdir=runs/shakespeare --corpus=data/input.txt

--requests loglikelihood requests (lines of --corpus cut at a random point, seeded, into
context and continuation, at most the model's context in tokens) are scored in process by
tools/lm_eval.py's `JaxlabLM` (--batch windows a call), then by a serve.py this script starts
on 127.0.0.1 with the payloads lm-eval's `local-completions` sends (--batch token-id prompts a
request, echo, logprobs 1, max_tokens 1), one request at a time as lm-eval's default
num_concurrent=1. Prints requests/s and tokens/s of each way, the time of one scoring call and
the share of each way's time spent outside the scoring program; checks that both ways give the
same log-likelihoods.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from runtime import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A language model's run directory.")
    flags.DEFINE_string("corpus", None, "A text file whose lines are the requests.")
    flags.DEFINE_integer("requests", 512, "Loglikelihood requests.")
    flags.DEFINE_integer("batch", 8, "Windows per scoring call; prompts per HTTP request.")
    flags.DEFINE_integer("seed", 0, "Where each line is cut into context and continuation.")
    flags.mark_flags_as_required(["workdir", "corpus"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str]) -> None:
    del argv
    import httpx

    import experiment
    from tools.lm_eval import JaxlabLM

    restored = experiment.restore_run(FLAGS.workdir)
    block = int(restored.model.block_size)
    with open(FLAGS.corpus, encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 2]
    rng = np.random.default_rng(FLAGS.seed)
    requests = []
    for i in range(FLAGS.requests):
        ids = [int(t) for t in restored.tokenizer.encode(lines[i % len(lines)])][:block]
        if len(ids) < 3:
            continue
        cut = int(rng.integers(1, len(ids) - 1))
        requests.append((None, ids[:cut], ids[cut:]))
    tokens = sum(len(c) + len(d) for _, c, d in requests)
    batch = FLAGS.batch
    lm = JaxlabLM(restored, batch_size=batch)
    lm._loglikelihood_tokens(requests[:batch])  # compiles
    start = time.perf_counter()
    local = [logprob for logprob, _ in lm._loglikelihood_tokens(requests)]
    t_local = time.perf_counter() - start
    windows = [np.asarray(c + d, np.int32) for _, c, d in requests[:batch]]
    start = time.perf_counter()
    for _ in range(5):
        lm.scorer.score(windows)
    t_call = (time.perf_counter() - start) / 5

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "serve.py", f"--workdir={FLAGS.workdir}", f"--port={port}",
         f"--max_batch_size={batch}", f"--score_rows={batch}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        served = []
        with httpx.Client(timeout=300) as client:
            start = time.perf_counter()
            for s in range(0, len(requests), batch):
                chunk = requests[s : s + batch]
                body = {"prompt": [c + d for _, c, d in chunk], "max_tokens": 1, "temperature": 0,
                        "logprobs": 1, "echo": True, "seed": 1234}  # fmt: skip
                reply = client.post(url + "/v1/completions", json=body).json()
                for (_, c, _), choice in zip(chunk, reply["choices"], strict=True):
                    served.append(sum(choice["logprobs"]["token_logprobs"][len(c) : -1]))
            t_server = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(60)
    calls = -(-len(requests) // batch)
    n = len(requests)
    print(json.dumps({
        "requests": n, "tokens": tokens, "batch": batch,
        "same_loglikelihoods": bool(np.allclose(local, served, rtol=1e-6, atol=0)),
        "in_process": {"s": round(t_local, 3), "requests_per_s": round(n / t_local, 1),
                       "tokens_per_s": round(tokens / t_local, 1),
                       "share_outside_scoring": round(max(0.0, 1 - calls * t_call / t_local), 3)},
        "server": {"s": round(t_server, 3), "requests_per_s": round(n / t_server, 1),
                   "tokens_per_s": round(tokens / t_server, 1),
                   "share_outside_scoring": round(max(0.0, 1 - calls * t_call / t_server), 3)},
        "scoring_call_s": round(t_call, 4),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    define_flags()
    cli.run(main)
