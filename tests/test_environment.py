"""The environment the tests run in is the one they claim: the tested default (constraints.txt's
pins, with the libtpu its jax was built for) or, under `make test-floor`, the floor (jax 0.11.2,
no TensorFlow). A pip that quietly resolved another jax fails here, not in a figure later."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = os.environ.get("JAXLAB_FLOOR_ENV") == "1"
FLOOR_JAX = "0.11.2"


def _pins() -> dict[str, str]:
    """{distribution: version} from constraints.txt's `name==version` lines."""
    pins = {}
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.strip()] = version.strip()
    return pins


@pytest.mark.skipif(FLOOR, reason="the floor environment pins its own versions")
def test_installed_versions_are_the_tested_pins():
    installed = {name: importlib.metadata.version(name) for name in _pins()}
    assert installed == _pins(), "make venv installs with -c constraints.txt; reinstall .venv"


def test_libtpu_is_the_one_the_installed_jax_was_built_for():
    """jax[tpu] names one libtpu series per jax release; another one may fail to compile or
    compile something else."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the floor environment has none)")
    wanted = [
        Requirement(r)
        for r in importlib.metadata.requires("jax") or []
        if Requirement(r).name == "libtpu" and 'extra == "tpu"' in r
    ]
    assert len(wanted) == 1
    installed = importlib.metadata.version("libtpu")
    assert wanted[0].specifier.contains(installed), (installed, str(wanted[0].specifier))


@pytest.mark.skipif(not FLOOR, reason="only under make test-floor")
def test_floor_environment_is_the_floor():
    import jax

    assert jax.__version__ == FLOOR_JAX
    assert importlib.metadata.version("jaxlib") == FLOOR_JAX
    for absent in ("tensorflow", "tensorflow_datasets"):
        assert importlib.util.find_spec(absent) is None, f"{absent} is installed in the floor"


def test_setup_py_admits_both_ends():
    """setup.py's jax range holds the floor and the tested default."""
    with open(os.path.join(REPO, "setup.py")) as f:
        text = f.read()
    spec = Requirement(re.search(r'"(jax[<>=][^"]*)"', text).group(1)).specifier
    assert spec.contains(FLOOR_JAX) and spec.contains(_pins()["jax"])


def test_start_up_line_names_the_platform_and_a_cpu_fallback(monkeypatch):
    """train.py's first line: what JAX runs on; a GPU plugin installed while JAX runs on the CPU
    (a driver it could not load) is said out loud."""
    import jax

    from runtime import distributed

    line = distributed.describe_devices()
    assert line.startswith(f"JAX {jax.__version__} on cpu: ") and "WARNING" not in line
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "jax_cuda13_plugin" else real(name, *a),
    )
    warned = distributed.describe_devices()
    assert "jax_cuda13_plugin is installed but JAX runs on the CPU" in warned
