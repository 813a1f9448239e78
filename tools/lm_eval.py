"""EleutherAI's Language Model Evaluation Harness (lm-eval) on a jaxlab run, in process.

    python -m tools.lm_eval --workdir=runs/gpt2 --tasks=hellaswag,arc_easy,lambada_openai
    python -m tools.lm_eval --workdir=runs/x --tasks=my_task --include_path=my_tasks/ --limit=100

`JaxlabLM` is an `lm_eval.api.model.TemplateLM` (registered as model 'jaxlab') over a restored
run (`experiment.restore_run`: the newest verified checkpoint, sharded on the devices at hand as
evaluate.py restores it, so a model that only fits sharded is evaluated sharded):
- `loglikelihood` and `loglikelihood_rolling` score token sequences with the run's compiled
  forward pass in float32 (serving/logprobs.py's `Scorer`: fixed [rows, block_size] batches,
  one compilation);
- `generate_until` decodes with the server's batching engine (serving/engine.py: every
  request in flight together, stop strings, and past the context nanoGPT's way).
Sequences are cut as lm-eval's `hf` backend cuts them for a Hugging Face model with the same
context (`max_length` = block_size): a loglikelihood request scores the last max_length + 1
tokens of context + continuation (the first only as context), a rolling one its text in
disjoint windows of max_length tokens, so an imported GPT-2 gets the numbers `transformers`
gets under `--model hf` (tests/test_lm_eval.py). lm-eval's `local-completions` against
`serve.py` can send the server at most block_size tokens a request (its windows are one token
shorter): with `max_length=block_size - 1` here the two score the same tokens, the same float32
log-probabilities (to their last bits: a window's row in the scoring batch may change those)
summed in the same order, and generate the same greedy text (tests/test_lm_eval.py).

The command writes lm-eval's results (its `results` and `configs`, with the run's step) to
`<workdir>/lm_eval.json` (or --output) and each task's metrics as TensorBoard scalars
`lm_eval/<task>/<metric>` at the checkpoint's step, in `<workdir>/lm_eval/tensorboard`; with
--log_samples, each document's arguments and responses in `<output stem>_samples/<task>.jsonl`.
lm-eval is an optional dependency (`pip install -c constraints.txt -e '.[eval]'`), imported
by this module only. Standard tasks download their data from the Hugging Face Hub; offline,
give local tasks (`--include_path`, lm-eval's YAML task format over local files;
docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from runtime import cli

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the command says how to install it; importing this module still works
    TemplateLM = object  # type: ignore[assignment,misc]

    def register_model(*names: str):  # type: ignore[no-redef]
        return lambda cls: cls


def _require_lm_eval() -> None:
    """Raises cli.UserError if lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise cli.UserError(
            "lm-eval is not installed: pip install -c constraints.txt -e '.[eval]'"
        ) from None


@register_model("jaxlab")
class JaxlabLM(TemplateLM):
    """lm-eval's model interface over a restored jaxlab language model (module docstring).

    Args:
      restored: experiment.restore_run's result; or None, and `workdir` (and `step`) are
        restored (lm-eval's `model_args`: `workdir=runs/x,step=1000`).
      batch_size: windows per scoring call (rounded up to the mesh's batch shards).
      num_slots: sequences the engine decodes together in `generate_until`.
      prefix_token_id: the token a text is scored after when it has no context (lm-eval's
        empty contexts and the first rolling window): default the tokenizer's end-of-text
        token, else the token of '\\n', else 0.
      max_length: lm-eval's `hf` backend's max_length: a scored sequence keeps at most
        max_length + 1 tokens (context and continuation), rolling windows are max_length
        tokens; default the model's context (block_size). Raises ValueError below 1.
    """

    def __init__(self, restored: Any = None, workdir: str | None = None,
                 step: int | None = None, batch_size: int = 8, num_slots: int = 8,
                 prefix_token_id: int | None = None, max_length: int | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__()
        import experiment
        from serving.logprobs import Scorer

        if restored is None:
            if workdir is None:
                raise ValueError("give a restored run or a workdir")
            restored = experiment.restore_run(workdir, None if step is None else int(step))
        if restored.config.task != "lm":
            raise ValueError(f"lm-eval evaluates language models; this run's task is "
                             f"{restored.config.task!r}")  # fmt: skip
        self.restored = restored
        self.tokenizer_ = restored.tokenizer
        self.block_size = int(restored.model.block_size)
        self._max_length = self.block_size if max_length is None else int(max_length)
        if self._max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self._max_length}")
        self.scorer = Scorer(restored, int(batch_size))
        self.num_slots = int(num_slots)
        self._engine = None
        self._prefix = prefix_token_id
        if self._prefix is None:
            self._prefix = self.tokenizer_.eot_id
        if self._prefix is None:
            try:
                self._prefix = int(self.tokenizer_.encode("\n")[0])
            except (ValueError, IndexError):
                self._prefix = 0

    # ----- tokens

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token (or the prefix token for a vocabulary without one)."""
        eot = self.tokenizer_.eot_id
        return int(self._prefix if eot is None else eot)

    @property
    def prefix_token_id(self) -> int:
        return int(self._prefix)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:  # fmt: skip
        """The run's tokenizer's ids of `string` (ordinary text: no token added)."""
        return [int(t) for t in self.tokenizer_.encode(string)]

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer_.decode(np.asarray(tokens, np.int64))

    # ----- scoring

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
        """(log p(continuation | context), whether the continuation is the greedy one) of
        each (key, context ids, continuation ids): the last max_length + 1 tokens of context +
        continuation scored together, as lm-eval's `hf` backend truncates them (a continuation
        longer than that is scored from its second kept token on: the first has no context)."""
        inputs, ctxlens = [], []
        keep = self.max_length + 1
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-keep:]
            inputs.append(np.asarray(whole, np.int32))
            cut = max(0, len(context) + len(continuation) - keep)
            ctxlens.append(max(1, len(context) - cut))
        out = []
        for (key, _, _), scores, ctxlen in zip(
            requests, self.scorer.score(inputs), ctxlens, strict=True
        ):
            # Python floats summed in order, as lm-eval sums the server's token_logprobs.
            logprob = sum(float(x) for x in scores.logprobs[ctxlen:])
            answer = (logprob, bool(scores.greedy[ctxlen:].all()))
            out.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request's text, in lm-eval's disjoint rolling windows of
        max_length tokens after the prefix token (as its `hf` backend cuts them)."""
        from lm_eval import utils

        out = []
        for request in requests:
            (string,) = request.args
            windows = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(logprob for logprob, _ in self._loglikelihood_tokens(windows))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ----- generation

    def _get_engine(self) -> Any:
        if self._engine is None:
            from serving import engine as engine_lib

            self._engine = engine_lib.LMEngine(
                self.restored.model, self.restored.params, self.tokenizer_, self.num_slots,
                max_waiting=1 << 30, slide_window=True,
            )  # fmt: skip
            self._engine.warm_up()
            self._engine.start()
        return self._engine

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The greedy (or, with a temperature, seeded) continuation of each context,
        ended by its `until` strings or `max_gen_toks` tokens; the context cut to its last
        max_length - max_gen_toks tokens as lm-eval's models cut it (to the last
        block_size when that leaves none). Generation goes past the context when it must."""
        from serving import engine as engine_lib

        engine = self._get_engine()
        sequences, texts, done = [], [], threading.Semaphore(0)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen_toks = int(gen_kwargs.pop("max_gen_toks", 256))
            # As lm-eval's local-completions asks the server: do_sample is dropped, temperature
            # defaults to 0 (greedy), the seed to 1234.
            gen_kwargs.pop("do_sample", None)
            temperature = float(gen_kwargs.pop("temperature", 0.0))
            seed = int(gen_kwargs.pop("seed", 1234))
            top_k = int(gen_kwargs.pop("top_k", 0) or 0)
            top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
            keep = self.max_length - max_gen_toks
            ids = np.asarray(self.tok_encode(context), np.int32)
            ids = ids[-keep:] if keep > 0 else ids[-self.block_size :]
            if ids.size == 0:
                ids = np.asarray([self.prefix_token_id], np.int32)
            texts.append("")

            def update(text: str, finish: str | None, i: int = i) -> None:
                texts[i] += text
                if finish is not None:
                    done.release()

            sequences.append(engine_lib.Sequence(
                prompt_ids=ids[-self.block_size :], max_tokens=max_gen_toks,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop=tuple(u for u in until if u), on_update=update, stream=False,
            ))  # fmt: skip
        engine.submit(sequences)
        for _ in sequences:
            done.acquire()
        if any(s.finish_reason == "error" for s in sequences):
            raise RuntimeError("generation failed: " + texts[0])
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def close(self) -> None:
        """Stops the generation engine's thread, if it was started."""
        if self._engine is not None:
            self._engine.stop()
            self._engine = None


def evaluate(lm: JaxlabLM, tasks: list[str], include_path: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None,
             include_defaults: bool = True,
             log_samples: bool = False) -> dict[str, Any]:  # fmt: skip
    """lm-eval's `simple_evaluate` of `lm` on `tasks` (names, or groups; those of
    `include_path`'s YAML files too): its results dict ('results', 'configs', ...; with
    log_samples, 'samples': each task's documents with the model's responses)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=log_samples, bootstrap_iters=0,
    )  # fmt: skip


def task_scalars(results: dict[str, Any]) -> dict[str, float]:
    """'<task>/<metric>' -> value for every numeric metric of lm-eval's results (the filter
    suffix ',none' dropped; standard errors left out)."""
    scalars = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            metric = name.removesuffix(",none")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            scalars[f"{task}/{metric.replace(',', '_')}"] = float(value)
    return scalars


def write_results(workdir: str, step: int, results: dict[str, Any], output: str | None) -> str:
    """Writes `results` (JSON: lm-eval's results and configs, the step) to output or
    <workdir>/lm_eval.json, and the task metrics as TensorBoard scalars 'lm_eval/...' at `step`
    under <workdir>/lm_eval/tensorboard. Returns the JSON's path."""
    from runtime import metrics_writer

    path = output or os.path.join(workdir, "lm_eval.json")
    report = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "results": results["results"],
        "configs": results.get("configs", {}),
        "versions": results.get("versions", {}),
        "n-shot": results.get("n-shot", {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    # resume_step: nothing of an earlier evaluation is truncated.
    writer = metrics_writer.MetricsWriter(os.path.join(workdir, "lm_eval"), resume_step=1 << 62)
    writer.write_scalars(step, task_scalars(results), prefix="lm_eval/")
    writer.close()
    return path


def write_samples(directory: str, results: dict[str, Any]) -> list[str]:
    """Writes each task's samples (lm-eval's per-document records: doc_id, doc, arguments,
    resps, filtered_resps, metrics...) as JSON lines to <directory>/<task>.jsonl, sanitized
    as lm-eval's own --log_samples files are (its EvaluationTracker: responses as strings,
    arguments as gen_args_i/arg_j). Returns the paths."""
    from lm_eval.utils import handle_non_serializable, sanitize_list

    os.makedirs(directory, exist_ok=True)
    paths = []
    for task, samples in results.get("samples", {}).items():
        path = os.path.join(directory, f"{task}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for sample in samples:
                sample = {
                    **sample,
                    "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                                  for i, arg in enumerate(sample["arguments"])},
                    "resps": sanitize_list(sample["resps"]),
                    "filtered_resps": sanitize_list(sample["filtered_resps"]),
                    "target": str(sample["target"]),
                }  # fmt: skip
                line = json.dumps(sample, default=handle_non_serializable, ensure_ascii=False)
                f.write(line + "\n")
        paths.append(path)
    return paths


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined only when run as a script)."""
    flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, config.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
    flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma-separated.")
    flags.DEFINE_string("include_path", None, "A directory of lm-eval YAML task files.")
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's).")
    flags.DEFINE_float("limit", None, "Examples per task (a count, or a fraction if < 1).")
    flags.DEFINE_integer("batch_size", 8, "Windows per scoring call.")
    flags.DEFINE_integer("num_slots", 8, "Sequences generated together.")
    flags.DEFINE_integer("max_length", None, "lm-eval's max_length (default: the model's "
                         "context, as its hf backend; block_size - 1 scores as through "
                         "serve.py).")  # fmt: skip
    flags.DEFINE_string("output", None, "Results path (default <workdir>/lm_eval.json).")
    flags.DEFINE_integer("cpu_devices", None, "Simulated CPU devices (testing sharded runs).")
    flags.DEFINE_bool("log_samples", False, "Also write each document's responses to "
                      "<output without .json>_samples/<task>.jsonl.")  # fmt: skip
    flags.mark_flags_as_required(["workdir", "tasks"])


def main(argv: Sequence[str]) -> None:
    """Restores the run, evaluates the tasks, prints the table and writes the results."""
    del argv
    _require_lm_eval()
    import jax
    from lm_eval.utils import make_table

    import experiment

    if FLAGS.cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    restored = experiment.restore_run(FLAGS.workdir, FLAGS.step)
    mesh = dict(restored.run.mesh.shape)
    print(f"Restored step {restored.step} on {jax.device_count()} {jax.default_backend()} "
          f"devices, mesh {mesh}", flush=True)  # fmt: skip
    try:
        lm = JaxlabLM(restored, batch_size=FLAGS.batch_size, num_slots=FLAGS.num_slots,
                      max_length=FLAGS.max_length)  # fmt: skip
    except ValueError as e:
        raise cli.UserError(f"--max_length: {e}") from None
    try:
        results = evaluate(lm, FLAGS.tasks, FLAGS.include_path, FLAGS.num_fewshot, FLAGS.limit,
                           log_samples=FLAGS.log_samples)  # fmt: skip
    finally:
        lm.close()
    print(make_table(results))
    path = write_results(FLAGS.workdir, restored.step, results, FLAGS.output)
    print(f"Wrote {path} and TensorBoard scalars lm_eval/* at step {restored.step}")
    if FLAGS.log_samples:
        samples = write_samples(path.removesuffix(".json") + "_samples", results)
        print("Wrote " + ", ".join(samples))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
