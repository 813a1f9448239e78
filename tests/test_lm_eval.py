"""lm-eval (EleutherAI's Language Model Evaluation Harness) on a jaxlab run, both ways and
offline: in process through tools/lm_eval.py's `JaxlabLM`, and through serve.py with lm-eval's
own `local-completions` model (token-id prompts, logprobs and echo, the server's tokenizer via
/tokenize). The tasks are local: a multiple-choice task, a perplexity task
(loglikelihood_rolling) and a generation task, in lm-eval's YAML format over local JSONL files
(nothing is downloaded: HF_DATASETS_OFFLINE). Both ways give the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["tiny_choice", "tiny_perplexity", "tiny_generation"]

CHOICE_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PERPLEXITY_YAML = """task: tiny_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/perplexity.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERATION_YAML = """task: tiny_generation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/generation.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(directory: str, corpus: str) -> str:
    """The three local tasks (YAML and JSONL) in `directory`, from `corpus`'s lines: choose
    the next word of a line among three, score whole lines, continue a line's beginning."""
    os.makedirs(directory, exist_ok=True)
    with open(corpus) as f:
        lines = [line.strip() for line in f if line.strip()][-24:]
    words = ["king", "lord", "love"]
    rows = {"choice": [], "perplexity": [], "generation": []}
    for i, line in enumerate(lines):
        head, _, rest = line.rpartition(" ")
        choices = [" " + rest.rstrip(".")] + [" " + w for w in words if w != rest.rstrip(".")][:2]
        rows["choice"].append({"context": head, "choices": choices, "label": 0})
        rows["perplexity"].append({"text": line})
        if i < 8:
            rows["generation"].append({"context": line[:12], "target": line[12:].split(".")[0]})
    for name, docs in rows.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    for name, template in [("choice", CHOICE_YAML), ("perplexity", PERPLEXITY_YAML),
                           ("generation", GENERATION_YAML)]:  # fmt: skip
        with open(os.path.join(directory, f"tiny_{name}.yaml"), "w") as f:
            f.write(template.format(dir=directory))
    return directory


@pytest.fixture(scope="module")
def tasks_dir(tiny_corpus, tmp_path_factory) -> str:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return write_tasks(str(tmp_path_factory.mktemp("lm_eval_tasks")), tiny_corpus)


@pytest.fixture(scope="module")
def in_process(trained_lm_run, tasks_dir) -> dict:
    """`python -m tools.lm_eval` on the tiny run: its printed table, results file and
    TensorBoard scalars."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.lm_eval", f"--workdir={trained_lm_run}",
         f"--tasks={','.join(TASKS)}", f"--include_path={tasks_dir}", "--batch_size=4"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    with open(os.path.join(trained_lm_run, "lm_eval.json")) as f:
        return {"report": json.load(f), "stdout": result.stdout}


def test_in_process_command_writes_results_and_scalars(trained_lm_run, in_process) -> None:
    """The command prints lm-eval's table and writes lm_eval.json (results of every task, at
    the checkpoint's step) and the metrics as TensorBoard scalars at that step."""
    from runtime import metrics_writer

    report = in_process["report"]
    assert report["step"] == 12 and set(report["results"]) == set(TASKS)
    choice = report["results"]["tiny_choice"]
    assert 0.0 <= choice["acc,none"] <= 1.0
    assert report["results"]["tiny_perplexity"]["bits_per_byte,none"] > 0
    assert "tiny_choice" in in_process["stdout"]
    rows = metrics_writer.read_jsonl(os.path.join(trained_lm_run, "lm_eval", "metrics.jsonl"))
    assert rows[-1]["step"] == 12
    assert rows[-1]["lm_eval/tiny_choice/acc"] == choice["acc,none"]
    events = os.listdir(os.path.join(trained_lm_run, "lm_eval", "tensorboard"))
    assert any("tfevents" in name for name in events)


def test_through_the_server_equals_in_process(trained_lm_run, tasks_dir, in_process,
                                              tmp_path) -> None:  # fmt: skip
    """lm-eval's own `local-completions` model against serve.py (token-id prompts, echo and
    logprobs, the server's tokenizer through /tokenize) gives the in-process numbers: the
    same accuracies and generated text (exact_match), and the same perplexities to float32
    rounding (a window's row in the scoring batch may change its last bits)."""
    from test_serve import Server

    server = Server(trained_lm_run, str(tmp_path / "server.log"), "--max_batch_size=4")
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        newline = server.post("/tokenize", {"prompt": "\n"}).json()["tokens"][0]
        model_args = (
            f"base_url={server.url}/v1/completions,model={os.path.basename(trained_lm_run)},"
            f"tokenizer_backend=remote,max_length=33,custom_prefix_token_id={newline},"
            "max_gen_toks=8"
        )
        output = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model=local-completions",
             f"--model_args={model_args}", f"--tasks={','.join(TASKS)}",
             f"--include_path={tasks_dir}", f"--output_path={output}", "--batch_size=4"],
            cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-5000:] + server.log()
    finally:
        server.stop()
    (path,) = [os.path.join(r, f) for r, _, fs in os.walk(output) for f in fs if "results" in f]
    with open(path) as f:
        served = json.load(f)["results"]
    local = in_process["report"]["results"]
    for task in TASKS:
        for metric, value in local[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                exact = metric.startswith(("acc", "exact_match"))
                np.testing.assert_allclose(served[task][metric], value, rtol=0 if exact else 1e-6,
                                           err_msg=metric)  # fmt: skip


def test_perplexity_bits_per_byte_is_jaxlabs_evaluation(trained_lm_run, tasks_dir,
                                                         in_process) -> None:  # fmt: skip
    """The perplexity task's bits per byte (lm-eval's loglikelihood_rolling through JaxlabLM)
    equals jaxlab's own evaluation loop (`evaluation.eval_sums`, what evaluate.py and training
    use) on the same rolling windows: the harness's windows of each text, each scored for its
    continuation tokens only, summed in nats, over ln 2 and the texts' UTF-8 bytes."""
    import math

    from lm_eval import utils

    import evaluation
    import experiment
    from tools.lm_eval import JaxlabLM

    restored = experiment.restore_run(trained_lm_run)
    lm = JaxlabLM(restored, batch_size=4)
    with open(os.path.join(tasks_dir, "perplexity.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    length = restored.config.model.block_size
    rows = []  # (inputs, targets, weights) of every window, padded to the block
    for text in texts:
        for context, continuation in (
            utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(
                token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
                max_seq_len=lm.max_length - 1, context_len=1,
            )
        ):  # fmt: skip
            whole = (list(context) + list(continuation))[-(length + 1) :]
            pad = length + 1 - len(whole)
            weights = np.zeros(length, np.float32)
            weights[len(whole) - 1 - len(continuation) : len(whole) - 1] = 1.0
            rows.append((whole[:-1] + [0] * pad, whole[1:] + [0] * pad, weights))
    assert len(rows) > len(texts)  # some texts span several windows
    size = restored.config.eval_batch_size
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        real = len(chunk)
        chunk += [chunk[0]] * (size - real)  # padding rows, masked out
        batches.append({
            "inputs": np.asarray([r[0] for r in chunk], np.int32),
            "targets": np.asarray([r[1] for r in chunk], np.int32),
            "weights": np.asarray([r[2] for r in chunk], np.float32),
            "mask": (np.arange(size) < real).astype(np.float32),
        })  # fmt: skip
    sums = evaluation.eval_sums(restored.run, restored.state, batches)
    assert int(sums["count"]) == sum(len(lm.tok_encode(t)) for t in texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ours = float(sums["loss_sum"]) / math.log(2) / num_bytes
    theirs = in_process["report"]["results"]["tiny_perplexity"]["bits_per_byte,none"]
    assert theirs == pytest.approx(ours, rel=1e-5)
