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


def _block_size(workdir: str) -> int:
    with open(os.path.join(workdir, "config.json")) as f:
        return int(json.load(f)["model"]["block_size"])


@pytest.fixture(scope="module")
def in_process(trained_lm_run, tasks_dir) -> dict:
    """`python -m tools.lm_eval` on the tiny run: its printed table, results file and
    TensorBoard scalars. max_length is one below the context, as lm-eval scores through the
    server (which takes at most a context of tokens a request)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    max_length = _block_size(trained_lm_run) - 1
    result = subprocess.run(
        [sys.executable, "-m", "tools.lm_eval", f"--workdir={trained_lm_run}",
         f"--tasks={','.join(TASKS)}", f"--include_path={tasks_dir}", "--batch_size=4",
         f"--max_length={max_length}"],
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
        # lm-eval's API models keep max_length - 1 tokens a request: the context here.
        model_args = (
            f"base_url={server.url}/v1/completions,model={os.path.basename(trained_lm_run)},"
            f"tokenizer_backend=remote,max_length={_block_size(trained_lm_run) + 1},"
            f"custom_prefix_token_id={newline},"
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
    length = restored.config.model.block_size
    lm = JaxlabLM(restored, batch_size=4, max_length=length - 1)  # as the in_process fixture
    with open(os.path.join(tasks_dir, "perplexity.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    rows = []  # (inputs, targets, weights) of every window, padded to the block
    for text in texts:
        for context, continuation in (
            utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(
                token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
                max_seq_len=lm.max_length, context_len=1,
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


def _kjv_task_corpus(path: str) -> str:
    """24 lines of the King James Bible: every third line eight verses long (~400 tokens of
    the reference tokenizer: several of its 128-token windows, and a multiple-choice context
    that must be cut), the others a verse each."""
    from data import sources

    verses = sources.load_text_corpus("kjv").splitlines()[20_000:20_200]
    lines, i = [], 0
    while len(lines) < 24:
        take = 8 if len(lines) % 3 == 2 else 1
        lines.append(" ".join(v.split(" ", 1)[1] for v in verses[i : i + take]))
        i += take
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_imported_gpt2_scores_as_transformers_under_lm_evals_hf_backend(tmp_path_factory) -> None:
    """A GPT-2 (tests/hf_reference.py's random one, context 128) imported into jaxlab gets,
    in process and with defaults, the numbers lm-eval's own `hf` backend gets from
    `transformers` on the original directory (run under .venv-torch), document by document:
    every log-likelihood to float32 rounding (the two frameworks' logits agree to ~1e-6), the
    same greediness, accuracies and greedy text. The texts span several context windows and
    some choice contexts must be cut, so both cut sequences alike (lm-eval's `hf` convention:
    max_length + 1 tokens scored together, rolling windows of max_length). jaxlab's side runs
    sharded, its parameters split over 4 devices (FSDP), as a model too large for one device
    is evaluated."""
    from test_hf_convert import _TORCH_ENV, TORCH_PYTHON, _build_reference, _shared_dir

    from hf import importing

    usable = os.path.exists(TORCH_PYTHON) and subprocess.run(
        [TORCH_PYTHON, "-c", "import lm_eval.models.huggingface, transformers"],
        capture_output=True, env=_TORCH_ENV,
    ).returncode == 0  # fmt: skip
    if not usable:
        pytest.skip("needs .venv-torch with torch, transformers and lm-eval: `make torch-env`")
    hf_dir = str(_build_reference(_shared_dir(tmp_path_factory)) / "gpt2_tiny")
    root = tmp_path_factory.mktemp("lm_eval_hf")
    tasks = write_tasks(str(root / "tasks"), _kjv_task_corpus(str(root / "kjv_lines.txt")))
    workdir = importing.import_hf(hf_dir, str(root / "imported"))
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    config["mesh_shape"] = {"data": 1, "fsdp": 4, "tensor": 1}  # as a run trained with FSDP
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    theirs_dir = root / "hf_results"
    common = [f"--tasks={','.join(TASKS)}", f"--include_path={tasks}"]
    hf = subprocess.run(
        [TORCH_PYTHON, "-m", "lm_eval", "run", "--model=hf", "--device=cpu", "--batch_size=1",
         f"--model_args=pretrained={hf_dir},dtype=float32", f"--output_path={theirs_dir}",
         "--log_samples", *common],
        cwd=str(root), capture_output=True, text=True, timeout=900, env={**_TORCH_ENV, **offline},
    )  # fmt: skip
    assert hf.returncode == 0, hf.stderr[-5000:]
    ours_path = str(root / "jaxlab_results.json")
    jaxlab = subprocess.run(
        [sys.executable, "-m", "tools.lm_eval", f"--workdir={workdir}", "--batch_size=4",
         f"--output={ours_path}", "--log_samples", "--cpu_devices=4", *common],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, **offline},
    )  # fmt: skip
    assert jaxlab.returncode == 0, jaxlab.stderr[-5000:]
    assert "on 4 cpu devices, mesh {" in jaxlab.stdout and "'fsdp': 4" in jaxlab.stdout
    files = {f: os.path.join(r, f) for r, _, fs in os.walk(theirs_dir) for f in fs}
    (path,) = [p for f, p in files.items() if f.startswith("results")]
    with open(path) as f:
        theirs = json.load(f)["results"]
    with open(ours_path) as f:
        ours = json.load(f)["results"]
    for task in TASKS:
        for metric, value in theirs[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                exact = metric.startswith(("acc", "exact_match"))
                np.testing.assert_allclose(ours[task][metric], value, rtol=0 if exact else 1e-5,
                                           err_msg=f"{task} {metric}")  # fmt: skip
    # Document by document: each choice's log-likelihood and greediness, each text's, each
    # generated text.
    for task in TASKS:
        (theirs_samples,) = [p for f, p in files.items() if f.startswith(f"samples_{task}_")]
        ours_samples = os.path.join(str(root / "jaxlab_results_samples"), f"{task}.jsonl")
        by_doc = []
        for samples in (theirs_samples, ours_samples):
            with open(samples) as f:
                rows = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
            by_doc.append([r["filtered_resps"] for r in rows])
        assert len(by_doc[0]) == len(by_doc[1]) == (8 if task == "tiny_generation" else 24)
        if task == "tiny_generation":  # text to compare, not empty strings
            assert all(resps[0] for resps in by_doc[0]), by_doc[0]
        for hf_resps, our_resps in zip(*by_doc, strict=True):
            if task == "tiny_generation":
                assert our_resps == hf_resps
                continue
            for hf_resp, our_resp in zip(hf_resps, our_resps, strict=True):
                hf_resp = hf_resp if isinstance(hf_resp, list) else [hf_resp]
                our_resp = our_resp if isinstance(our_resp, list) else [our_resp]
                np.testing.assert_allclose(float(our_resp[0]), float(hf_resp[0]), rtol=1e-5)
                assert our_resp[1:] == hf_resp[1:], task  # greedy or not
