"""Shared fixtures: a shrunk copy of the shipped task, and two ways to run the real entry point.

`run(...)` calls train.main() in this process (a second or less: nothing to import again), with one
torch thread, as `accelerate launch` gives each process, so its runs are bitwise comparable with
the CLI's. `launch(...)` runs `accelerate launch train.py ...` exactly as a user would; the tests
that need it (several processes, signals, kills) are marked slow. The data is 320 training and 64
validation lines of the shipped sample data: 20 optimizer steps per epoch at a global batch of 16.
"""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# Tokenized data is cached by the datasets library; the tests use a cache of their own.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="template-tests-datasets-"))
TRAIN_ROWS, VALID_ROWS = 320, 64


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, rows in [("train", TRAIN_ROWS), ("valid", VALID_ROWS)]:
        lines = (ROOT / "data" / f"{name}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=1, check=True, cwd=ROOT, env=None, script="train.py", config=None):
    """Runs train.py under `accelerate launch` (with configs/accelerate/CONFIG if given: 2 CPU
    processes); returns the CompletedProcess (stdout + stderr as text)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if config:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / config), "--main_process_port", str(free_port())]
    elif processes > 1:
        # On a machine without GPUs this is what makes --multi_gpu start CPU processes over gloo.
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    result = subprocess.run(command + [script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=240)  # a hung run fails the test instead of the whole CI job
    if check and result.returncode != 0:
        raise AssertionError(f"train.py exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run(*args, processes=1, check=True):
    """train.main(args) in this process when processes == 1, else launch(): a result like launch()'s."""
    if processes > 1:
        return launch(*args, processes=processes, check=check)
    import train
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            train.main([str(a) for a in args])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
            stderr.write(f"{e.code}\n" if not isinstance(e.code, int) else "")
    result = SimpleNamespace(returncode=status, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    if check and status != 0:
        raise AssertionError(f"train.main exited {status}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def data_args(data):
    return ["--train_file", data / "train.jsonl", "--valid_file", data / "valid.jsonl"]


def weights(checkpoint):
    return load_file(Path(checkpoint) / "model.safetensors")


def assert_bitwise_equal(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k]))]
    assert not different, f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:3]}"


def read_json(path):
    return json.loads(Path(path).read_text())


STEPS_PER_EPOCH = 20  # 320 rows at a global batch of 16
SETUPS = {1: ["--batch_size", 8, "--accumulation", 2], 2: ["--batch_size", 8]}


def common_args(tiny_data, processes):
    """The runs that resume tests compare: 2 epochs, warmup, a checkpoint every 7 optimizer steps."""
    return [*data_args(tiny_data), "--epochs", 2, "--num_warmup_steps", 5, "--save_steps", 7, *SETUPS[processes]]


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory):
    """reference(processes): the outdir of the uninterrupted run, made once per session."""
    folder, made = tmp_path_factory.mktemp("reference"), {}

    def get(processes):
        if processes not in made:
            run(*common_args(tiny_data, processes), "--outdir", folder / str(processes), processes=processes)
            made[processes] = folder / str(processes)
        return made[processes]
    return get


sys.path.insert(0, str(ROOT))  # the tests import train, modeling and dataset like a user's script would
# One torch thread, in this process and (chosen as a user would) in every process the tests start:
# in-process runs and CLI runs then compare bitwise.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def tiny_tokenizer():
    """What dataset.py gives for assets/tiny-bert (a config only): a vocabulary learnt from data/train.jsonl."""
    import dataset
    from core import options
    return dataset.load_tokenizer(ROOT / "assets" / "tiny-bert", options.parse_args([]))
