"""tools/plot.py and the Accelerate configs in configs/accelerate/.

tools/plot.py turns a log.json into a PNG or says in one line why not; tools/gpu_check.py skips
without CUDA; every config in configs/accelerate/ loads and says how to launch with it, and cpu.yaml
runs 2 processes.

    python -m pytest -q tests/template/test_tools.py
    python -m pytest -q -m slow tests/template/test_tools.py    # cpu.yaml: 2 processes
"""

import json
import os
import subprocess
import sys
import types

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

import modeling
from conftest import TREE, data_args, epochs, read_json, read_log, run, tiny_tokenizer

CONFIGS = TREE / "configs" / "accelerate"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def log_json(tmp_path):
    """A log.json as train.py writes it, 3 epochs."""
    log = {
        f"Epoch {i}": {
            "train_log": {"loss": 1.0 / (i + 1), "lr": 1e-3},
            "valid_log": {
                "loss": 1.1 / (i + 1),
                "accuracy": 0.5 + 0.1 * i,
                "macro_f1": 0.4 + 0.1 * i,
            },
        }
        for i in range(3)
    }
    path = tmp_path / "model" / "log.json"
    path.parent.mkdir()
    path.write_text(json.dumps(log))
    return path


def plot(*args, env=None):
    return subprocess.run(
        [sys.executable, "tools/plot.py", *map(str, args)],
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_plot_writes_a_png(log_json, tmp_path):
    result = plot(log_json)
    assert result.returncode == 0, result.stderr
    png = log_json.with_suffix(".png")  # next to the log by default
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    result = plot(log_json, "-o", tmp_path / "figures" / "curves.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "figures" / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_draws_a_run_validated_every_n_steps_by_step(tiny_data, tmp_path):
    more = ["--epochs", 1, "--eval_steps", 5, "--log_every", 5]
    run(*data_args(tiny_data), "--batch_size", 16, *more, "--outdir", tmp_path / "model")
    result = plot(tmp_path / "model" / "log.json", "-o", tmp_path / "steps.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Wrote {tmp_path / 'steps.png'} (4 steps)"  # 5, 10, 15, 20
    assert (tmp_path / "steps.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib(log_json, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = plot(log_json, env={"PYTHONPATH": str(fake.parent)})
    assert result.returncode == 1
    assert result.stderr.strip() == "tools/plot.py needs matplotlib: pip install matplotlib"
    assert not log_json.with_suffix(".png").exists()


def test_plot_missing_log(tmp_path):
    result = plot(tmp_path / "log.json")
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {tmp_path / 'log.json'}: no such file"
    )


def test_plot_not_a_log(tmp_path):
    path = tmp_path / "log.json"
    path.write_text('{"Epoch 0": 5}')
    result = plot(path)
    assert result.returncode == 1 and result.stderr.startswith(
        f"error: {path}: not a log.json of train.py"
    )


@pytest.mark.slow
def test_cpu_config_runs_two_processes(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    # ACCELERATE_USE_CPU=1, as cpu.yaml says: else a machine with no GPU starts 2 separate runs.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        CONFIGS / "cpu.yaml",
        "train.py",
        *data_args(tiny_data),
        "--outdir",
        outdir,
        "--epochs",
        1,
        "--batch_size",
        8,
    ]
    result = subprocess.run(
        list(map(str, command)), cwd=TREE, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-5000:]
    files = {p.name for p in (outdir / "last").iterdir()}
    assert {
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    } <= files  # one per process: world size 2
    assert "rng_state_2.safetensors" not in files
    assert read_json(outdir / "last" / "trainer_state.json")["num_processes"] == 2
    assert list(epochs(read_log(outdir / "log.json"))) == ["Epoch 0"]


EXPECTED = {
    "cpu.yaml": DistributedType.MULTI_GPU,  # torchrun-started processes, made CPU ones by use_cpu
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "fsdp_cpu.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero2_cpu.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3_cpu.yaml": DistributedType.DEEPSPEED,
}


def test_every_config_is_known():
    assert sorted(p.name for p in CONFIGS.glob("*")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_says_how_to_launch(name):
    config = load_config_from_file(
        str(CONFIGS / name)
    )  # what `accelerate launch --config_file` reads
    assert config.distributed_type == EXPECTED[name]
    assert (
        f"accelerate launch --config_file configs/accelerate/{name}" in (CONFIGS / name).read_text()
    )
    assert config.num_processes >= 1 and config.num_processes % config.num_machines == 0
    if config.distributed_type == DistributedType.DEEPSPEED:  # train.py accumulates itself
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
        stage = int(name.removeprefix("deepspeed_zero")[0])
        assert config.deepspeed_config["zero_stage"] == stage


def test_fsdp_saves_full_weights_and_wraps_the_default_model_layers():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    model = modeling.build_model(
        TREE / "assets" / "tiny-bert",
        types.SimpleNamespace(labels=["a", "b"], tokenizer=tiny_tokenizer()),
    )
    layer_classes = {type(module).__name__ for module in model.modules()}
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= layer_classes


def test_gpu_check_skips_in_one_line_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run python tools/gpu_check.py itself")
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py"],
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU on this machine; nothing was checked."
    ]
