"""Serves a trained run over HTTP: batched text completion (GPT) or image classification.

    python serve.py --workdir=runs/shakespeare [--host=127.0.0.1 --port=8000]
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8, "seed": 1}'

The run is restored with experiment.restore_run (the newest verified checkpoint, or --step, and
the run's tokenizer: the path sample.py and evaluate.py take). The port opens at once; /healthz
answers 503 'warming_up' until every program the requests use is compiled, then 200 'ready'.
Language models: POST /v1/completions (OpenAI's fields, with logprobs and echo; concurrent
requests decoded together by serving/engine.py), POST /v1/chat/completions (runs with a chat
template), GET /tokenizer_info, POST /tokenize and /detokenize (vLLM's, for lm-eval).
Classifiers: POST /v1/classify. Both: GET /healthz, GET /v1/models, GET /v1/models/{id}.
SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and exits 0.
docs/serving.md has the API and the design.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from absl import flags

import experiment
from runtime import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script: importing serve defines none)."""
    flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, config.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step to serve (default: the latest).")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: every one).")
    flags.DEFINE_integer("port", 8000, "TCP port.")
    flags.DEFINE_integer("max_batch_size", 32, "Language models: sequences decoded together.")
    flags.DEFINE_integer(
        "max_queue", 64, "Sequences (or classify requests) that may wait; beyond, 503."
    )
    flags.DEFINE_integer("classify_batch_size", 64, "Classifiers: images per compiled call.")
    flags.DEFINE_float(
        "graceful_timeout_s", 60.0, "On SIGTERM, how long in-flight requests may take."
    )
    flags.DEFINE_string("log_level", "warning", "uvicorn's log level (info logs each request).")
    flags.DEFINE_bool(
        "slide_window", False, "Language models: generate past the context as sample.py does "
        "(each token past it a full forward pass over the last block_size tokens).",
    )  # fmt: skip
    flags.DEFINE_integer("score_rows", 8, "Language models: windows per scoring call (logprobs).")
    flags.DEFINE_string(
        "chat_template", None, "A Jinja2 chat template file for /v1/chat/completions (default: "
        "the workdir's chat_template.jinja or tokenizer_config.json, if any).",
    )  # fmt: skip
    flags.mark_flag_as_required("workdir")


def _check_port_free(host: str, port: int) -> None:
    """Raises cli.UserError if nothing can listen on host:port (in use, or no such address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise cli.UserError(f"--host={host}: not an address of this machine ({e}).") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise cli.UserError(
                f"--port={port}: cannot listen on {host}:{port} ({e.strerror}); choose another "
                "port or stop what uses it."
            ) from None


def main(argv: Sequence[str]) -> None:
    """Restores the run, opens the port, warms up in the background and serves until SIGTERM."""
    del argv
    import uvicorn

    from serving import api
    from serving.chat import TemplateError
    from serving.service import Service

    for name in ("max_batch_size", "max_queue", "classify_batch_size", "score_rows"):
        if FLAGS[name].value < 1:
            raise cli.UserError(f"--{name}={FLAGS[name].value}: must be at least 1.")
    if not 0 <= FLAGS.port < 65536:
        raise cli.UserError(f"--port={FLAGS.port}: must be in [0, 65535].")
    _check_port_free(FLAGS.host, FLAGS.port)  # before the (slower) restore
    restored = experiment.restore_run(FLAGS.workdir, FLAGS.step)
    try:
        service = Service(
            restored,
            FLAGS.workdir,
            num_slots=FLAGS.max_batch_size,
            max_waiting=FLAGS.max_queue,
            classify_batch_size=FLAGS.classify_batch_size,
            slide_window=FLAGS.slide_window,
            score_rows=FLAGS.score_rows,
            chat_template=FLAGS.chat_template,
        )
    except TemplateError as e:
        raise cli.UserError(str(e)) from None
    server = uvicorn.Server(
        uvicorn.Config(
            api.create_app(service),
            host=FLAGS.host,
            port=FLAGS.port,
            log_level=FLAGS.log_level,
            timeout_graceful_shutdown=FLAGS.graceful_timeout_s,
        )
    )

    def fatal() -> None:
        server.should_exit = True

    service.on_fatal = fatal
    # uvicorn re-raises the signal that stopped it once it has drained; after a clean drain this
    # process exits 0 rather than dying of that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    print(
        f"serving {service.model_id} ({service.task}, step {restored.step}) on "
        f"http://{FLAGS.host}:{FLAGS.port} (warming up; GET /healthz says when ready)",
        flush=True,
    )
    server.run()
    if service.warmup_error is not None:
        raise SystemExit(f"ERROR: warm-up failed: {service.warmup_error}")
    print("stopped: in-flight requests finished", flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
