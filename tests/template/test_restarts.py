"""The same command continues: under `accelerate launch --max_restarts 2 ... --resume auto`, one
worker killed with SIGKILL mid-epoch makes torchrun's agent start the group again, which continues
from last/ and ends bitwise where the run never stopped would (1 and 2 processes on CPU).

    pytest -m slow tests/template/test_restarts.py
"""

import os
import subprocess
import sys

import pytest

from conftest import assert_bitwise_equal, common_args, free_port, home, read_json


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
            f"error: another process of this run stopped (process 0 saw its connection close mid-step); "
            f"{outdir / 'last'} is the last whole checkpoint (step 7). Continue with: "
        ) in first_run, first_run
        assert "Traceback" not in first_run, first_run
    assert_bitwise_equal(reference(processes) / "last", outdir / "last")
    assert_bitwise_equal(reference(processes) / "best", outdir / "best")
    assert read_json(outdir / "log.json") == read_json(reference(processes) / "log.json")
