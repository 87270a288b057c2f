"""The processes: signals, torchrun's restarts, a dead peer, CPU threads, refused launches.

SIGTERM, Ctrl-C, SIGKILL and a SIGTERM to the launcher alone stop a run that then resumes bitwise;
a worker killed under --max_restarts is started again with its group and the run ends bitwise, the
surviving peer saying so in one line; the CPU threads of each process; fp16 on a CPU
refused before anything is written (core/processes.py).

    python -m pytest -q tests/template/test_processes.py
    python -m pytest -q -m slow tests/template/test_processes.py    # signals and kills, launched
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train
from conftest import (
    TREE,
    assert_bitwise_equal,
    common_args,
    data_args,
    fork,
    free_port,
    home,
    launch,
    python_train,
    read_json,
    read_log,
)
from core import checkpoint

# -------------------------------------- signals: the run saves last/ and stops, and resumes bitwise


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
    """Starts the CLI like launch() does, in a session of its own so that the test can signal all of
    it."""
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


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_alone_saves_and_stops_the_training_processes(
    processes, tiny_data, tmp_path
):
    """Schedulers and `kill PID` often signal only `accelerate launch`: its train.py processes must
    not train on orphaned, but save last/ and stop, printing a resume command that works as
    printed."""
    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, processes, "--save_steps", 3, "--log_every", 1)
    wait_for_checkpoint(outdir, 3, process)
    process.send_signal(signal.SIGTERM)  # the launcher only, not its process group
    output, _ = process.communicate(
        timeout=120
    )  # EOF once every train.py holding the pipe has exited
    assert f"Stopped by signal {int(signal.SIGTERM)}" in output
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (
        state["num_processes"] == processes and state["global_step"] < 40
    )  # stopped early, not trained on
    command = output.split("Continue with: ", 1)[1].splitlines()[0]
    expected = (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py"
        if processes == 2
        else "accelerate launch train.py"
    )
    assert command == f"{expected} --resume {outdir}/last"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)
    resumed = subprocess.run(
        command, shell=True, cwd=TREE, env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 2


def test_sigterm_to_the_launcher_of_one_process_is_said_at_once_and_acted_on_after_the_step(
    tiny_data, tmp_path
):
    """`(accelerate launch train.py ... &)` from a shell, then `kill -TERM` to the launcher, with
    slow steps: train.py once trained on for up to --log_every steps (50 s on a loaded machine)
    without a word. One process asks after every step (a flag, no collective) and says at once
    what it does."""
    slow = "        import time\n        time.sleep(0.2)\n        pooled = self.encoder"
    tree = fork(tmp_path, {"modeling.py": {"        pooled = self.encoder": slow}})
    outdir = tmp_path / "model"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["train.py", *common_args(tiny_data, 1), "--log_every", 1000, "--save_steps", 0]
    command += ["--model_name_or_path", TREE / "assets" / "tiny-bert", "--outdir", outdir]
    launcher = subprocess.Popen(
        [*map(str, command)],
        cwd=tree,
        env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (outdir / ".lock").exists():  # taken just before the first step
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # a few steps of 0.4 s (2 batches of 0.2 s)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)  # EOF: train.py ended too
    finally:
        launcher.kill()
    assert "SIGTERM: finishing the step (or validation) in progress, then saving last/" in output
    assert f"Stopped by signal {int(signal.SIGTERM)}" in output
    step = read_json(outdir / "last" / "trainer_state.json")["global_step"]
    assert 1 <= step < 20, step  # before the end of the epoch (20 steps), its first save


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_a_second_one_stops_at_once(tiny_data, reference, tmp_path):
    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, 1, "--save_steps", 3, "--log_every", 1)
    wait_for_checkpoint(outdir, 3, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends to the whole foreground job
    output, _ = process.communicate(timeout=120)
    assert (
        f"Stopped by signal {int(signal.SIGINT)}" in output
        and "Continue with: accelerate launch" in output
    )
    assert (
        'train.py", line' not in output
    )  # no traceback of ours (the launcher prints its own on SIGINT)
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")

    again = tmp_path / "again"
    process = start(tiny_data, again, 1, "--save_steps", 1, "--log_every", 1)
    wait_for_checkpoint(again, 2, process)
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    checkpoint.verify(checkpoint.find(again / "last"), recover=False)  # the last whole checkpoint
    assert not list(again.glob(".staging*"))
    launch("--resume", again / "last")
    assert read_json(again / "last" / "trainer_state.json")["epoch"] == 2


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_moment_after_a_checkpoint(tiny_data, reference, tmp_path):
    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, 1)
    wait_for_checkpoint(outdir, 14, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")


# ---------------------------- a worker killed: torchrun's agent restarts the group, which continues


def restarting_launch(*args, processes, env):
    """`accelerate launch --max_restarts 2` on CPU processes: torchrun's elastic agent, which starts
    the whole group again with the same arguments when a worker dies. One process: torchrun itself
    (accelerate launch runs a single process without the agent)."""
    if processes == 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--max_restarts",
            "2",
            "--monitor_interval",
            "1",
            "--master_port",
            str(free_port()),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            str(processes),
            "--max_restarts",
            "2",
            "--monitor_interval",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", **env}
    return subprocess.run(
        [*command, "tests/kill_once.py", *map(str, args)],
        cwd=home(),
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_killed_mid_epoch_is_restarted_and_the_run_ends_bitwise(
    processes, tiny_data, reference, tmp_path
):
    outdir = tmp_path / "model"
    result = restarting_launch(
        *common_args(tiny_data, processes),
        "--outdir",
        outdir,
        "--resume",
        "auto",
        processes=processes,
        env={
            "KILL_ONCE": str(tmp_path / "killed"),
            "KILL_AT": "10",
            "KILL_RANK": str(processes - 1),
        },
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "killed").exists()  # the kill happened
    assert f"--resume auto: continuing {outdir / 'last'} (step 7)." in result.stderr
    if processes == 2:  # the survivor: one line, not gloo's traceback
        first_run = result.stderr.split("--resume auto: continuing")[0]
        assert (
            "error: another process of this run stopped (process 0 saw its connection close "
            f"mid-step); {outdir / 'last'} is the last whole checkpoint (step 7). Continue with: "
        ) in first_run, first_run
        assert "Traceback" not in first_run, first_run
    assert_bitwise_equal(reference(processes) / "last", outdir / "last")
    assert_bitwise_equal(reference(processes) / "best", outdir / "best")
    assert read_log(outdir / "log.json") == read_log(reference(processes) / "log.json")


# ---------------------------------------------------------------- CPU threads per process


@pytest.mark.slow
@pytest.mark.parametrize("processes, chosen", [(1, None), (2, None), (1, "1")])
def test_every_core_under_accelerate_launch_unless_the_user_chose(processes, chosen, tmp_path):
    """accelerate launch gives each process one thread; train.py takes physical cores /
    processes."""
    import psutil

    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")
    }
    if chosen:
        env["OMP_NUM_THREADS"] = chosen
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
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--main_process_port", "0"]
    result = subprocess.run(
        [
            *command,
            "train.py",
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--outdir",
            str(tmp_path / "model"),
        ],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    cores = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
    expected = int(chosen) if chosen else max(1, cores // processes)
    assert f"{expected} CPU thread(s) per process" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_another_thread_count_on_resume_is_said(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--batch_size",
            "32",
            "--epochs",
            "2",
            "--outdir",
            str(outdir),
            "--stop_after_steps",
            "3",
        ]
    )
    state = read_json(outdir / "last" / "trainer_state.json")
    assert state["threads"] == 1  # the tests' one thread
    state["threads"] = 4
    (outdir / "last" / "trainer_state.json").write_text(json.dumps(state))
    manifest = read_json(outdir / "last" / "manifest.json")
    from core import checkpoint

    manifest["files"]["trainer_state.json"] = checkpoint.sha256(
        outdir / "last" / "trainer_state.json"
    )
    checkpoint.write_json(outdir / "last" / "manifest.json", manifest)
    from conftest import run as run_in_process

    result = run_in_process("--resume", outdir / "last")
    assert "changed on resume: 4 -> 1 CPU threads per process" in result.stdout


# ------------------------------------ launches refused before anything, and what the launcher shows


BATCH_16 = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


def test_a_cpu_config_launched_without_accelerate_use_cpu_is_one_line_before_anything(
    tiny_data, tmp_path
):
    """configs/accelerate/fsdp_cpu.yaml without ACCELERATE_USE_CPU=1 (no GPU): the launcher starts
    2 processes of which accelerate makes 2 runs of 1 process, each its own main process: once,
    one saved checkpoints without model.safetensors. Now one line, and no outdir."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    config = home() / "configs" / "accelerate" / "fsdp_cpu.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--main_process_port", str(free_port()), "train.py", *data_args(tiny_data)]
    result = subprocess.run(
        [*map(str, command), "--outdir", str(tmp_path / "model")],
        cwd=home(),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0 and not (tmp_path / "model").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the launcher started 2 processes, but accelerate made each a run of its own (1 "
        "process, no process group): on a machine without GPUs, set ACCELERATE_USE_CPU=1 before "
        "`accelerate launch` (as configs/accelerate/fsdp_cpu.yaml says), or launch one process."
    ], result.stderr[-3000:]


def test_fp16_on_a_cpu_is_refused_naming_bf16(tiny_data, tmp_path):
    result = python_train(
        *data_args(tiny_data), "--mixed_precision", "fp16", "--outdir", tmp_path / "m", check=False
    )
    assert result.returncode == 1 and not (tmp_path / "m").exists()
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --mixed_precision fp16 on a CPU: accelerate would run it in float32")
    ), result.stderr
    assert "--mixed_precision bf16" in result.stderr and "Traceback" not in result.stderr


def test_accelerate_launch_quiet_shows_our_line_only(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "-q",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "train.py",
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--outdir",
            str(tmp_path / "model"),
        ],
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "missing.jsonl: no such data file" in result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
