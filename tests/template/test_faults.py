"""Whatever happens to a run, nothing checkpointed is lost and no checkpoint is half-written.

The process is killed inside a save, right after one and between steps, sent SIGTERM, denied disk
space; checkpoint files are corrupted or replaced by a malicious pickle. Each resume must end
bitwise equal to the uninterrupted run, or be refused with a message naming the file.

    pytest tests/template/test_faults.py
"""

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import TREE, assert_bitwise_equal, common_args, data_args, launch, read_json
from core import checkpoint as checkpoint_module
from core import options

# Moments of the 2nd save (step 14; the 1st is at step 7) where tests/crash.py kills the process:
# right after the N-th rename onto NAME.
CRASHES = {
    ("trainer_state.json", 2): "inside a save, optimizer.pt written, manifest not yet",
    (".old-last", 1): "between the two renames: last/ moved away, the new one not yet in place",
    ("last", 2): "right after the new last/ is in place, before the old one is removed",
    ("log.json", 2): "right after a complete save, before the next step",
}


@pytest.mark.slow
@pytest.mark.parametrize("name, count", CRASHES, ids=[f"{name}-{count}" for name, count in CRASHES])
def test_killed_during_or_after_a_save_then_resumed_is_bitwise_the_uninterrupted_run(
    name, count, tiny_data, reference, tmp_path
):
    outdir = tmp_path / "model"
    crashed = launch(
        name,
        count,
        *common_args(tiny_data, 1),
        "--outdir",
        outdir,
        script="tests/crash.py",
        check=False,
    )
    assert crashed.returncode != 0, "the fault was not injected"
    assert not (outdir / "last").exists() or read_json(outdir / "last" / "manifest.json")[
        "global_step"
    ] in (7, 14)
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")
    assert read_json(outdir / "log.json") == read_json(reference(1) / "log.json")


def wait_for_checkpoint(outdir, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if read_json(outdir / "last" / "manifest.json")["global_step"] >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} appeared")


def start(tiny_data, outdir, processes, *extra):
    """Starts the CLI like launch() does, in a session of its own so that the test can signal all of it."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    command += ["--multi_gpu"] if processes > 1 else []
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if processes > 1 else os.environ
    return subprocess.Popen(
        command
        + [
            "train.py",
            *map(str, common_args(tiny_data, processes)),
            "--outdir",
            str(outdir),
            *map(str, extra),
        ],
        cwd=TREE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_moment_after_a_checkpoint(tiny_data, reference, tmp_path):
    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, 1)
    wait_for_checkpoint(outdir, 14, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_last_then_resume_is_bitwise(processes, tiny_data, reference, tmp_path):
    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, processes, "--save_steps", 3)
    wait_for_checkpoint(outdir, 3, process)
    os.killpg(
        process.pid, signal.SIGTERM
    )  # like Slurm or `docker stop`: every process of the job gets it
    output, _ = process.communicate(timeout=120)
    assert f"Stopped by signal {int(signal.SIGTERM)}" in output
    state = read_json(outdir / "last" / "trainer_state.json")
    assert state["num_processes"] == processes and 3 <= state["global_step"] < 40
    launch("--resume", outdir / "last", processes=processes)
    assert_bitwise_equal(reference(processes) / "last", outdir / "last")


@pytest.mark.slow
def test_sigterm_exit_status_is_143(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    process = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *map(str, data_args(tiny_data)),
            "--outdir",
            str(outdir),
            "--save_steps",
            "2",
            "--batch_size",
            "8",
        ],
        cwd=TREE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_for_checkpoint(outdir, 2, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143
    assert f"--resume {outdir}/last" in output
    assert read_json(outdir / "last" / "manifest.json")["global_step"] > 2


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", corrupt),
        ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("rng_state_0.safetensors", lambda p: p.unlink()),
    ],
)
def test_a_damaged_checkpoint_file_is_refused_by_name(name, damage, reference, tmp_path):
    checkpoint = tmp_path / "last"
    shutil.copytree(reference(1) / "last", checkpoint)
    damage(checkpoint / name)
    with pytest.raises(SystemExit, match=f"{name} is missing, truncated or changed"):
        checkpoint_module.verify(checkpoint)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = None


def test_a_malicious_lr_bin_is_refused_and_never_runs(reference, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "pwned"
    checkpoint = tmp_path / "last"
    shutil.copytree(reference(1) / "last", checkpoint)
    (checkpoint / "lr.bin").write_bytes(pickle.dumps(Payload()))
    manifest = read_json(
        checkpoint / "manifest.json"
    )  # as an attacker would: the manifest is no signature
    manifest["files"]["lr.bin"] = checkpoint_module.sha256(checkpoint / "lr.bin")
    checkpoint_module.write_json(checkpoint / "manifest.json", manifest)
    with pytest.raises(SystemExit, match="lr.bin: refused to load"):
        train.main(
            ["--resume", str(checkpoint), "--outdir", str(tmp_path / "out"), "--epochs", "3"]
        )
    assert not SENTINEL.exists()


def test_disk_full_during_a_save_leaves_the_previous_checkpoint_intact(
    tiny_data, tmp_path, monkeypatch
):
    outdir = tmp_path / "model"
    real_save, calls = checkpoint_module.torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if (
            len(calls) == 3
        ):  # the 2nd checkpoint's optimizer.pt (each checkpoint writes 2 files this way)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(
        SystemExit, match="could not write a checkpoint .*No space left on device.* are intact"
    ):
        train.main(
            [
                *map(str, data_args(tiny_data)),
                "--outdir",
                str(outdir),
                "--save_steps",
                "3",
                "--batch_size",
                "32",
            ]
        )
    assert read_json(outdir / "last" / "manifest.json")["global_step"] == 3
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    checkpoint_module.verify(outdir / "last")  # every file matches the manifest
    train.main(["--resume", str(outdir / "last")])
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 5


def test_resuming_into_another_architecture_is_refused_even_with_ignore_mismatch(
    reference, tmp_path
):
    from transformers import DistilBertConfig

    other = tmp_path / "distilbert"
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(other)
    with pytest.raises(SystemExit, match="model_name_or_path .* differs"):
        options.parse_args(
            ["--resume", str(reference(1) / "last"), "--model_name_or_path", str(other)]
        )
    with pytest.raises(SystemExit, match="its weights do not fit the model"):
        train.main(
            [
                "--resume",
                str(reference(1) / "last"),
                "--model_name_or_path",
                str(other),
                "--epochs",
                "3",
                "--ignore_mismatch",
                "--outdir",
                str(tmp_path / "out"),
            ]
        )
