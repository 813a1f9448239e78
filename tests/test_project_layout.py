"""The house itself: installing adds no module of ours, importing defines no flag, a model is one
file plus one config, and every command reports a user's mistake as one ERROR line."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_MODULES = sorted(
    name[:-3] for name in os.listdir(REPO) if name.endswith(".py") and name != "setup.py"
)
COMMAND_MODULES = ["train", "evaluate", "sample", "serve", "data.__main__", "data.prepare",
                   "tools.bench", "tools.quantize", "tools.export", "tools.aot", "tools.hf_convert",
                   "tools.sweep.__main__"]  # fmt: skip
PACKAGES = sorted(
    name for name in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, name, "__init__.py"))
)
SCRIPTS = sorted(n for n in os.listdir(os.path.join(REPO, "scripts")) if n.endswith(".py"))


def _python(code: str, cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip


def test_installing_adds_no_top_level_module_of_ours(tmp_path):
    """From outside the repository (the venv has jaxlab installed, editable), none of our
    modules or packages is importable: `import evaluate` finds another package (Hugging Face's,
    which lm-eval brings) or nothing, never ours."""
    names = ROOT_MODULES + PACKAGES + ["tests"]
    ours = {n: [f"{REPO}/{n}.py", f"{REPO}/{n}/__init__.py"] for n in names}
    code = (f"import importlib.util as u; print([n for n, paths in {ours!r}.items() "
            f"if (s := u.find_spec(n)) and s.origin in paths])")  # fmt: skip
    result = _python(code, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_importing_a_command_defines_no_flag():
    """Every command defines its flags under __main__, so commands import one another freely.
    (Libraries they import, absl's logging or TensorFlow, define flags of their own.)"""
    ours = ROOT_MODULES + PACKAGES
    code = textwrap.dedent(f"""
        import importlib
        from absl import flags
        import importlib.util, sys
        for name in {COMMAND_MODULES!r}:
            importlib.import_module(name)
        sys.path.insert(0, "scripts")
        for name in {SCRIPTS!r}:
            if name != "nanogpt_torch_baseline.py":  # PyTorch's own environment
                importlib.import_module(name[:-3])
        modules = flags.FLAGS.flags_by_module_dict()
        ours = {ours!r} + [n[:-3] for n in {SCRIPTS!r}]
        print(sorted(m for m in modules if m.split(".")[0] in ours))
    """)
    result = _python(code, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "command",
    [
        ["train.py", "--config=configs/fashion_mnist_mlp.py", "--workdir={missing}",
         "--config.mesh_shape.tensor=3"],
        ["evaluate.py", "--workdir={missing}"],
        ["sample.py", "--workdir={missing}"],
        ["serve.py", "--workdir={missing}"],
        ["-m", "tools.export", "--workdir={missing}", "--output={missing}/out"],
        ["-m", "tools.quantize", "--workdir={missing}"],
        ["-m", "tools.hf_convert", "export", "--workdir={missing}", "--hf_dir={missing}/out"],
    ],
    ids=["train", "evaluate", "sample", "serve", "export", "quantize", "hf_convert"],
)  # fmt: skip
def test_a_users_mistake_is_one_error_line(command, tmp_path):
    """A config that cannot run, or a workdir that is not there: exit status 1 and one line
    starting with ERROR:, no traceback."""
    missing = str(tmp_path / "no_such_run")
    args = [a.replace("{missing}", missing) for a in command]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.stderr[-3000:]


def test_sample_command_runs_as_the_readme_shows(trained_lm_run):
    """sample.py restores a language-model run and prints the samples and the speed."""
    result = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={trained_lm_run}", "--prompt=The king",
         "--num_samples=2", "--max_new_tokens=8", "--seed=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("The king") == 2
    assert "tokens/s" in result.stdout


MODEL_FILE = '''
"""Multinomial logistic regression on raw pixels: the smallest image classifier."""

import jax.numpy as jnp
from flax import linen as nn

from models.preprocessing import pixels_to_unit_range


class LogisticRegression(nn.Module):
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = pixels_to_unit_range(x.reshape((x.shape[0], -1)), self.dtype)
        kernel_init = nn.with_logical_partitioning(
            nn.linear.default_kernel_init, ("embed", "classes")
        )
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init)(x)
        return logits.astype(jnp.float32)


Model = LogisticRegression
TASK = "classification"
'''

CONFIG_FILE = '''
"""Logistic regression on Fashion-MNIST, a few steps."""

import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.model = ml_collections.ConfigDict({"name": "logistic_regression", "num_classes": 10})
    c.batch_size = 64
    c.num_train_steps = 30
    c.learning_rate = 1e-2
    c.log_every_steps = 10
    c.eval_every_steps = 30
    c.checkpoint_every_steps = 30
    c.async_checkpointing = False
    return c
'''


def test_a_new_model_is_one_file_and_one_config(tmp_path, fashion_mnist_ready):
    """A copy of the repository gets models/logistic_regression.py and
    configs/logistic_regression.py, nothing else; train.py trains it (the loss falls) and
    evaluate.py evaluates it, found by the file's name."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv*", ".data", ".git", "runs", "__pycache__", "*cache*")
    shutil.copytree(REPO, repo, ignore=ignore)
    (repo / "models" / "logistic_regression.py").write_text(MODEL_FILE)
    (repo / "configs" / "logistic_regression.py").write_text(CONFIG_FILE)
    env = {**os.environ, "JAXLAB_DATA_DIR": sources.default_data_dir()}
    workdir = str(tmp_path / "run")
    train = subprocess.run(
        [sys.executable, "train.py", "--config=configs/logistic_regression.py",
         f"--workdir={workdir}"],
        cwd=repo, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    progress = [line for line in train.stdout.splitlines() if line.startswith("step ")]
    losses = [float(ln.split("| loss ")[1].split(" ")[0]) for ln in progress if "| loss" in ln]
    assert len(losses) == 3 and losses[-1] < losses[0], train.stdout
    evaluate = subprocess.run(
        [sys.executable, "evaluate.py", f"--workdir={workdir}"],
        cwd=repo, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "accuracy=" in evaluate.stdout


def test_a_deprecated_api_called_from_our_code_fails_the_tests(tmp_path):
    """conftest turns deprecations at our call sites into errors, in tests and in the scripts
    they start, so that code that would break on the next JAX release fails here first."""
    import jax

    mesh = jax.make_mesh((1,), ("data",))
    # `with mesh:` is deprecated in JAX 0.10 (`with jax.set_mesh(mesh):` replaces it).
    with pytest.raises(DeprecationWarning, match="jax.set_mesh"), mesh:
        pass
    script = tmp_path / "old_api.py"
    script.write_text("import warnings\nwarnings.warn('old API', DeprecationWarning)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode != 0 and "DeprecationWarning: old API" in result.stderr
    # Warnings as if raised in a module: ours (and only ours, not one whose name starts alike,
    # such as click.core or setuptools for cli and setup) are errors.
    import warnings

    for module in ("models.gpt", "train", "hf.importing", "test_train"):
        with pytest.raises(DeprecationWarning):
            warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module=module)
    for module in ("orbax.lib", "click.core", "setuptools.dist", "trainer", "cli_tools"):
        warnings.warn_explicit("internal", DeprecationWarning, "x.py", 1, module=module)


# ----------------------------------------------------------------------------- the house's shape

# The root holds what a researcher reads to follow an update, the user commands and the design
# card's modules; everything else lives in a package (data/, runtime/, hf/, serving/, tools/).
ROOT_TRAINING_PATH = {
    "train", "steps", "experiment", "optim", "sharding", "train_state", "checkpointing",
    "config_validation", "input_pipeline", "evaluation", "finetune", "sampling",
    "evaluate", "sample", "serve",
}  # fmt: skip
MAX_MODULE_LINES = 600


def _project_files() -> dict[str, str]:
    """Dotted module name -> path, for every module of the project but the tests."""
    found = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "tests")
                   and not d.endswith(".egg-info") and d != "__pycache__"]  # fmt: skip
        for name in files:
            if name.endswith(".py") and name != "setup.py":
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, module: str, modules: set[str]) -> set[str]:
    """The project modules `module` imports, anywhere in the file (functions included) but under
    `if TYPE_CHECKING:`, which never runs."""
    import ast

    tree = ast.parse(pathlib.Path(path).read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}  # fmt: skip
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def _import_graph() -> dict[str, set[str]]:
    files = _project_files()
    return {module: _imports(path, module, set(files)) for module, path in files.items()}


def test_no_import_cycle():
    """No module imports, directly or through others, a module that imports it back."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == 1:
                return path[path.index(dependency) :] + [dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_nothing_below_tools_imports_tools():
    """tools/ and scripts/ are commands; the library they use never imports them back."""
    offenders = {module: sorted(d for d in deps if d.split(".")[0] == "tools")
                 for module, deps in _import_graph().items()
                 if module.split(".")[0] not in ("tools", "scripts")}  # fmt: skip
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_root_holds_the_training_path_and_the_commands():
    """A new root module is a deliberate change to this list: plumbing goes into a package."""
    assert set(ROOT_MODULES) == ROOT_TRAINING_PATH


def test_no_module_is_too_long_to_read():
    """Outside scripts/ (one-off measurements) and tests/, a module fits in one sitting."""
    lengths = {module: len(pathlib.Path(path).read_text().splitlines())
               for module, path in _project_files().items()
               if not module.startswith("scripts.")}  # fmt: skip
    assert {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_none_is_settable_wherever_a_field_may_be_none(tmp_path):
    """`--config.decay_steps=None` (an int field whose default is None) and a nested one set
    None, as optim.py's messages and sweep grids ask; a field that must not be None, or one
    that does not exist, is one ERROR line naming it."""
    script = tmp_path / "show_config.py"
    script.write_text(
        textwrap.dedent("""
        from absl import flags
        from ml_collections import config_flags
        from runtime import cli

        def main(argv):
            c = flags.FLAGS.config
            print(c.decay_steps, c.init_from.step, c.learning_rate)

        if __name__ == "__main__":
            config_flags.DEFINE_config_file("config", None, "config", lock_config=True)
            cli.run(main)
    """)
    )
    env = {**os.environ, "PYTHONPATH": REPO}

    def show(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), "--config=configs/shakespeare_char_cpu.py", *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip

    result = show("--config.decay_steps=None", "--config.init_from.step=None")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "None", "0.001"]
    assert show("--config.decay_steps=7").stdout.split()[0] == "7"
    missing = show("--config.decay_stepz=None")
    assert missing.returncode == 1
    assert "ERROR: --config.decay_stepz=None: the config has no field 'decay_stepz'." in (
        missing.stderr
    )
    import config_validation
    from configs import shakespeare_char_cpu

    config = shakespeare_char_cpu.get_config()
    config.learning_rate = None  # what --config.learning_rate=None sets: refused before a run
    with pytest.raises(config_validation.ConfigError, match="learning_rate=None has type"):
        config_validation.validate(config, num_devices=1)
