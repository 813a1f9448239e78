"""Load test of serve.py's completions on 127.0.0.1: throughput, latency and memory.

    python scripts/load_test.py --workdir=runs/shakespeare            # starts serve.py itself
    python scripts/load_test.py --url=http://127.0.0.1:8000 --server_pid=1234

For each number of concurrent clients (--concurrency, default 1, 8 and 32), every client sends
completion requests back to back (--max_tokens new tokens after --prompt, sampled at
--temperature, a different seed each) for --duration_s seconds or until --max_requests have
been sent, and the script prints requests/s, generated tokens/s, p50 and p99 latency and the
number of errors. Then a soak at the highest concurrency for --soak_s seconds (when the
server's pid is known) prints the server's resident memory (RSS, from /proc) at its start and
end. Last, it prints whether each target is met: when --concurrency includes 1 and a higher
level, tokens/s at the highest concurrency at least 8x one client's, zero errors there, and its
p99 latency within 3x one client's p50; after a soak, the server's RSS within 50 MB of its
start. Only loopback addresses are accepted: this is a measurement of our server, not a tool to
load anyone else's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from runtime import cli  # noqa: E402

FLAGS = flags.FLAGS
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def define_flags() -> None:
    """The script's flags (defined only when run as a script)."""
    flags.DEFINE_string("workdir", None, "A language-model run: start serve.py on it.")
    flags.DEFINE_string("url", None, "Or: a running server on 127.0.0.1 (e.g. :8000).")
    flags.DEFINE_integer("server_pid", None, "With --url: the server's pid, for its memory.")
    flags.DEFINE_integer("port", 8765, "With --workdir: the port serve.py listens on.")
    flags.DEFINE_integer("max_batch_size", 32, "With --workdir: serve.py's slots.")
    flags.DEFINE_list("concurrency", ["1", "8", "32"], "Concurrent clients, level by level.")
    flags.DEFINE_float("duration_s", 20.0, "Seconds per level.")
    flags.DEFINE_integer("max_requests", 2000, "Requests per level, at most.")
    flags.DEFINE_float("soak_s", 120.0, "Soak at the highest concurrency (0: none).")
    flags.DEFINE_string("prompt", "\n", "Prompt of every request.")
    flags.DEFINE_integer("max_tokens", 64, "New tokens per request.")
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature.")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (VmRSS of /proc/<pid>/status; Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


async def run_level(url: str, clients: int, duration_s: float, max_requests: int,
                    body: dict, seed0: int) -> dict:  # fmt: skip
    """`clients` concurrent clients sending `body` back to back for `duration_s` seconds or
    `max_requests` requests in all: requests/s, tokens/s, latency percentiles (s), errors."""
    import httpx

    latencies, tokens, errors = [], [], []
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json={**body, "seed": seed0 + sent})
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                    continue
                if r.status_code != 200:
                    errors.append(str(r.status_code))
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.json()["usage"]["completion_tokens"])

        await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": sum(tokens) / elapsed,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float = 600) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise cli.UserError(f"serve.py exited with status {proc.returncode} before ready.")
        try:
            r = httpx.get(url + "/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise cli.UserError(f"{url}/healthz did not report ready within {timeout_s:.0f} s.")


def main(argv: Sequence[str]) -> None:
    """Starts (or finds) the server, runs the levels and the soak, prints figures and verdicts."""
    del argv
    import httpx

    if (FLAGS.workdir is None) == (FLAGS.url is None):
        raise cli.UserError("give --workdir (start serve.py on a run) or --url, not both.")
    levels = sorted({int(c) for c in FLAGS.concurrency})
    if not levels or levels[0] < 1:
        raise cli.UserError(f"--concurrency={FLAGS.concurrency}: positive integers.")
    proc = None
    if FLAGS.workdir is not None:
        url = f"http://127.0.0.1:{FLAGS.port}"
        command = [sys.executable, "serve.py", f"--workdir={FLAGS.workdir}",
                   f"--port={FLAGS.port}", f"--max_batch_size={FLAGS.max_batch_size}",
                   f"--max_queue={max(64, 2 * levels[-1])}"]  # fmt: skip
        proc = subprocess.Popen(command, cwd=REPO)
        pid = proc.pid
    else:
        url = FLAGS.url.rstrip("/")
        host = urllib.parse.urlparse(url).hostname
        if host not in LOOPBACK:
            raise cli.UserError(f"--url={FLAGS.url}: only a server on 127.0.0.1 is load-tested.")
        pid = FLAGS.server_pid
    try:
        health = _wait_ready(url, proc)
        (model,) = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        print(f"model {model['id']} (step {model['step']}, {model['num_params']:,} parameters, "
              f"context {model['block_size']}), {health['slots']} slots; prompt "
              f"{FLAGS.prompt!r}, {FLAGS.max_tokens} new tokens, temperature "
              f"{FLAGS.temperature}")  # fmt: skip
        body = {"prompt": FLAGS.prompt, "max_tokens": FLAGS.max_tokens,
                "temperature": FLAGS.temperature}  # fmt: skip
        results = {}
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} "
              f"{'p99 s':>7} {'errors':>6}")  # fmt: skip
        for i, clients in enumerate(levels):
            r = asyncio.run(run_level(url, clients, FLAGS.duration_s, FLAGS.max_requests, body,
                                      seed0=i * 1_000_000))  # fmt: skip
            results[clients] = r
            print(f"{clients:7d} {r['requests']:8d} {r['requests_per_s']:7.2f} "
                  f"{r['tokens_per_s']:9.1f} {r['p50_s']:7.3f} {r['p99_s']:7.3f} "
                  f"{r['errors']:6d} {' '.join(r['error_kinds'])}", flush=True)  # fmt: skip
        soak = None
        if FLAGS.soak_s > 0 and pid is not None:
            start_mb = rss_mb(pid)
            soak = asyncio.run(run_level(url, levels[-1], FLAGS.soak_s, 10**9, body, 10**8))
            end_mb = rss_mb(pid)
            print(f"soak: {levels[-1]} clients for {soak['seconds']:.0f} s, {soak['requests']} "
                  f"requests, {soak['tokens_per_s']:.1f} tokens/s, {soak['errors']} errors; "
                  f"server RSS {start_mb:.1f} MB at start, {end_mb:.1f} MB at end "
                  f"({end_mb - start_mb:+.1f} MB)")  # fmt: skip
        one, top = results[levels[0]], results[levels[-1]]
        if levels[0] == 1 and len(levels) > 1:
            speedup = top["tokens_per_s"] / one["tokens_per_s"]
            ratio = top["p99_s"] / one["p50_s"]
            print(f"target: tokens/s at {levels[-1]} clients >= 8x one client's: "
                  f"{speedup:.1f}x -> {'met' if speedup >= 8 else 'NOT met'}")  # fmt: skip
            print(f"target: zero errors at {levels[-1]} clients: {top['errors']} -> "
                  f"{'met' if top['errors'] == 0 else 'NOT met'}")  # fmt: skip
            print(f"target: p99 at {levels[-1]} clients <= 3x one client's latency (p50): "
                  f"{ratio:.2f}x -> {'met' if ratio <= 3 else 'NOT met'}")  # fmt: skip
        if soak is not None:
            grown = end_mb - start_mb
            print(f"target: memory flat over the soak (within 50 MB): {grown:+.1f} MB -> "
                  f"{'met' if abs(grown) <= 50 else 'NOT met'}")  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
