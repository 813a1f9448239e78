"""tools/aot.py: the train and eval steps compiled for TPU topologies on this CPU (libtpu's
compile-only devices), their memory against the arithmetic, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from runtime import cli
from tools import aot  # sets libtpu's offline environment (before JAX, where it comes first)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GPT = [
    "--config=configs/gpt2_small.py",
    "--config.model.num_layers=2",
    "--config.model.embed_dim=64",
    "--config.model.num_heads=4",
    "--config.model.block_size=64",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
]


@pytest.fixture(autouse=True)
def libtpu_installed() -> None:
    """Not skipped: without libtpu these tests fail and say how to install it."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(
            "libtpu is not installed, so nothing can be compiled for a TPU: `make setup` "
            "installs it (jax[tpu] is in setup.py's dev extra)."
        )


def _tiny_gpt(**model):
    from configs import gpt2_small

    config = gpt2_small.get_config()
    config.model.update(num_layers=2, embed_dim=64, num_heads=4, block_size=64, **model)
    config.batch_size = config.eval_batch_size = 8
    return config


def _analyze(config, topology: str = "v5e:2x2", num_slices: int = 1, **mesh) -> dict:
    config.mesh_shape.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    topo = aot.get_topology(topology, num_slices)
    return aot.analyze(config, topo)


def _aot(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m tools.aot` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "tools.aot", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_offline_environment() -> None:
    """Without a TPU attached, libtpu is kept off the metadata server and the lockfile."""
    assert not cli.tpu_attached()
    assert os.environ["TPU_SKIP_MDS_QUERY"] == "1"
    assert os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"


@pytest.mark.parametrize(
    "mesh, shards",
    [
        (dict(data=4), 1),  # data parallel: every chip holds all of the state
        (dict(fsdp=4), 4),  # FSDP: a quarter each
        (dict(tensor=4), None),  # Megatron: heads, MLP and vocabulary split, the rest not
        (dict(data=2, tensor=2), None),
    ],
    ids=["data", "fsdp", "tensor", "data_x_tensor"],
)
def test_gpt_compiles_for_v5e_meshes(mesh: dict, shards: int | None) -> None:
    """The GPT's steps compile for v5e:2x2 on each mesh; per-chip state bytes match the
    arithmetic (parameters: float32 x count / shards; AdamW: two moments per parameter)."""
    result = _analyze(_tiny_gpt(), **mesh)
    assert result["device_kind"] == "TPU v5 lite" and result["num_chips"] == 4
    assert result["fits"] and result["train_fits"] and result["eval_fits"]
    total = 4 * result["num_params"]
    per_chip = result["params_bytes_per_device"]
    if shards is not None:
        assert per_chip == pytest.approx(total / shards, rel=0.01)
    else:  # tensor-split matrices, replicated norms and positions: between the two
        assert total / 4 < per_chip < total / 1.5
    assert result["opt_state_bytes_per_device"] == pytest.approx(2 * per_chip, rel=0.01)
    # The train step's arguments are the state and the batch; the state is donated (aliased).
    assert result["train_argument_bytes"] >= result["state_bytes_per_device"]
    assert result["train_alias_bytes"] >= 0.99 * result["state_bytes_per_device"]
    assert result["train_total_bytes"] < result["hbm_bytes_per_device"] == 16 * 2**30
    assert result["train_compile_s"] > 0 and result["eval_compile_s"] > 0
    # FLOPs: XLA's count of the compiled step near the analytic 6N + 12LHQT per token.
    assert result["xla_flops_note"] == "per step"
    ratio = result["xla_flops_per_device"] / result["analytic_flops_per_step_per_device"]
    assert 0.8 < ratio < 1.5, ratio
    assert result["step_time_at_50pct_mfu_s"] == pytest.approx(
        result["analytic_flops_per_step_per_device"] / (0.5 * 197e12)
    )


def test_moe_compiles_with_experts_over_the_chips() -> None:
    """An MoE GPT (8 experts, top-2) compiles for v5e:2x2 with expert=4: the report names the
    expert axis, the batch splits over it (8 sequences: 2 per chip), and each chip holds a
    quarter of the experts' parameters and all of the rest."""
    import jax
    import numpy as np

    import models

    config = _tiny_gpt(moe_num_experts=8, moe_top_k=2, moe_hidden_dim=64)
    result = _analyze(config, expert=4)
    assert result["train_fits"] and result["eval_fits"]
    assert "expert=4" in result["mesh"] and result["batch_per_data_parallel_device"] == 2
    model = models.build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
    expert_params = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
        if "moe" in jax.tree_util.keystr(path) and "router" not in jax.tree_util.keystr(path)
    )
    total = 4 * result["num_params"]  # float32 bytes
    assert expert_params > 0
    assert result["params_bytes_per_device"] == pytest.approx(
        total - 4 * expert_params * 3 / 4, rel=0.01
    )


def test_scan_layers_and_two_slices() -> None:
    """A scanned GPT compiles for two v5e:2x2 slices (data parallel over the slices, FSDP
    inside), its parameters sharded as the unrolled model's."""
    result = _analyze(_tiny_gpt(scan_layers=True), "v5e:2x2", num_slices=2, data=2, fsdp=4)
    assert result["num_devices"] == 8 and result["num_slices"] == 2 and result["fits"]
    assert result["scan_layers"] is True and "scan_layers" in result["xla_flops_note"]
    assert result["params_bytes_per_device"] == pytest.approx(
        4 * result["num_params"] / 4, rel=0.01
    )


def test_tpu7x_two_devices_per_chip() -> None:
    """The newest generation (Ironwood, `tpu7x:2x2x1`): 4 chips whose two TensorCores are two
    devices each, so each device gets half a chip's HBM and peak; a tiny GPT compiles over all 8."""
    topo = aot.get_topology("tpu7x:2x2x1")
    assert (len(topo.devices), topo.num_chips, topo.devices_per_chip) == (8, 4, 2)
    assert topo.hbm_per_device == 96 * 2**30 and topo.peak_flops_per_device == 2307e12 / 2
    result = _analyze(_tiny_gpt(), "tpu7x:2x2x1", fsdp=8)
    assert result["num_devices"] == 8 and result["fits"]


def test_cnn_compiles_with_steps_per_dispatch() -> None:
    """The CNN (a classifier on uint8 pixels, 20 steps per compiled call) compiles too, for
    the image shape config.synthetic gives (32x32 RGB: a 3x3 valid convolution to 30x30,
    pooled to 15x15)."""
    from configs import fashion_mnist_cnn

    config = fashion_mnist_cnn.get_config()
    config.model.update(conv_features=(8,), dense_features=(16,))
    config.synthetic.image_shape = (32, 32, 3)
    config.batch_size = 32
    result = _analyze(config, data=2, tensor=2)
    assert result["fits"] and result["steps_per_dispatch"] == 20
    assert result["analytic_flops_per_step_per_device"] is None
    assert "steps_per_dispatch=20" in result["xla_flops_note"]
    assert result["num_params"] == 8 * 9 * 3 + 8 + 15 * 15 * 8 * 16 + 16 + 16 * 10 + 10


def test_largest_fitting_search() -> None:
    """Doubling then bisection finds the largest fitting multiple with few probes."""
    for threshold in (0, 1, 5, 8, 37, 100):
        probes = []

        def fits(m, threshold=threshold, probes=probes):
            probes.append(m)
            return m <= threshold

        assert aot.largest_fitting(fits, 1, 64) == min(threshold, 64)
        assert len(probes) <= 14
    assert aot.largest_fitting(lambda m: True, 4, 10) == 10
    # With a tolerance the search stops early, within it.
    probes = []
    found = aot.largest_fitting(lambda m: probes.append(m) or m <= 300, 8, 10_000, 0.25)
    assert 300 / 1.25 <= found <= 300 and len(probes) <= 9, (found, probes)


def test_find_max_batch() -> None:
    """The search compiles at multiples of the data-parallel size, up to the limit."""
    config = _tiny_gpt()
    config.mesh_shape.update(data=4, fsdp=1, tensor=1)
    topo = aot.get_topology("v5e:2x2")
    found = aot.find_max_batch(config, topo, "full", limit=16)
    assert found["remat_policy"] == "full" and found["batch_multiple"] == 4
    assert found["max_global_batch"] == 16
    assert [p["batch"] for p in found["probes"]] == [8, 16]
    # The command's own analysis at the config's batch is the search's first probe, reused
    # rather than compiled again (its compile time comes from the analysis).
    config.model.remat_policy = "full"
    analysis = {"global_batch": 8, "train_fits": True, "train_compile_s": -1.0,
                "train_total_bytes": 1}  # fmt: skip
    again = aot.find_max_batch(config, topo, "full", limit=16, known=analysis)
    assert again["max_global_batch"] == 16
    assert [p["compile_s"] for p in again["probes"]][0] == -1.0
    assert again["probes"][1]["compile_s"] > 0
    assert aot.remat_policies(config) == [
        "none",
        "full",
        "dots_saveable",
        "dots_with_no_batch_dims_saveable",
    ]


def test_does_not_fit_exits_1_with_the_numbers() -> None:
    """A batch far beyond v5e's 16 GiB: exit status 1, the table, and the bytes."""
    proc = _aot(*TINY_GPT, "--topology=v5e:2x2", "--config.model.vocab_size=50304",
                "--config.batch_size=65536", "--noeval")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("DOES NOT FIT: the train step needs"), last
    assert "GiB" in last and "a v5e chip has 16 GiB HBM (v5e:2x2)" in last
    record = json.loads(proc.stdout.strip().splitlines()[-2])
    assert record["fits"] is False and record["train_needed_gib_per_device"] > 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v9:2x2"], "unknown TPU generation 'v9'"),
        (["--topology=v5e:3x3"], "libtpu cannot make this topology"),
        (
            ["--topology=v5e:2x2", "--config.mesh_shape.fsdp=8", "--config.mesh_shape.data=1"],
            "needs 8 devices but 4 are present",
        ),  # fmt: skip
        (["--topology=v5e:2x2", "--config.batch_size=6"], "does not divide over 4"),
        (
            ["--topology=v5e:2x2", "--config.synthetic.num_train_examples=0"],
            "config.synthetic.num_train_examples=0 must be a positive integer",
        ),  # fmt: skip
    ],
    ids=[
        "unknown_topology",
        "bad_dimensions",
        "mesh_too_big",
        "batch_not_dividing",
        "bad_synthetic_field",
    ],  # fmt: skip
)
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    """Each mistake ends the command with exit status 1 and one ERROR line naming it."""
    proc = _aot(*TINY_GPT, *args)
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: "), errors
    assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


def test_no_flags_defined_on_import() -> None:
    """Importing the tool defines no flags (they are defined under __main__)."""
    from absl import flags

    assert "topology" not in flags.FLAGS
