"""The same command continues under a real Slurm: requeued, or stopped by its --signal.

configs/slurm/cpu.sbatch submitted to a one-node cluster started here (tests/template/slurm.py),
requeued mid-run with `scontrol requeue` and once stopped by its own --signal before a short time
limit, ends with last/, best/ and log.json bitwise equal to the same training never interrupted.

    python -m pytest -q -m slow tests/template/test_slurm.py    # as root with Slurm's packages
"""

import os
import shutil
import sys
import time

import pytest
import slurm

from conftest import TREE, assert_bitwise_equal, launch, read_log

pytestmark = pytest.mark.slow  # ~2.5 min: Slurm's daemons, three runs of ~35 s
# 7500 steps (375 an epoch): longer than Slurm takes to send a --signal (its checks are ~30 s
# apart).
OPTIONS = ["--epochs", 20, "--batch_size", 8, "--save_steps", 50, "--lr", 1e-3]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm.missing()
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    with slurm.Cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The training file (3000 rows), the validation file, and the run never interrupted."""
    folder = tmp_path_factory.mktemp("slurm-data")
    shutil.copy(TREE / "data" / "train.jsonl", folder / "train.jsonl")
    shutil.copy(TREE / "data" / "valid.jsonl", folder / "valid.jsonl")
    data = ["--train_file", folder / "train.jsonl", "--valid_file", folder / "valid.jsonl"]
    launch(*data, *OPTIONS, "--outdir", folder / "whole")
    return data, folder / "whole"


def job_env():
    """What the job runs with: this virtual environment first on PATH, one torch thread."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }


def assert_same_run(outdir, whole):
    assert_bitwise_equal(whole / "last", outdir / "last")
    assert_bitwise_equal(whole / "best", outdir / "best")
    assert read_log(outdir / "log.json") == read_log(whole / "log.json")


def test_a_job_requeued_mid_run_continues_bitwise(cluster, files, tmp_path):
    data, whole = files
    outdir = tmp_path / "model"
    job = cluster.sbatch(
        TREE / "configs" / "slurm" / "cpu.sbatch",
        *data,
        *OPTIONS,
        "--outdir",
        outdir,
        cwd=TREE,
        env=job_env(),
        options=["--output", tmp_path / "job.out"],
    )
    deadline = time.monotonic() + 120
    while not (outdir / "last").is_dir():  # the first checkpoint, at step 50 of 2250
        assert time.monotonic() < deadline and cluster.state(job) in ("PENDING", "RUNNING"), (
            cluster.state(job)
        )
        time.sleep(0.2)
    cluster.run("scontrol", "requeue", job)
    start_again(cluster, job)
    assert cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300) == "COMPLETED"
    log = (tmp_path / "job.out").read_text()
    assert "DUE TO JOB REQUEUE" in log and "Stopped by signal 15 after" in log
    assert f"--resume auto: {outdir} holds no checkpoint: a new run." in log
    assert f"--resume auto: continuing {outdir / 'last'} (step " in log
    assert "Restarts=1" in cluster.run("scontrol", "show", "job", job).stdout
    assert_same_run(outdir, whole)


def start_again(cluster, job):
    """A requeued job waits out Slurm's requeue delay (~2 min); the test starts it again sooner,
    once the old incarnation is gone (sooner, Slurm kills it: "Job credential revoked")."""
    cluster.wait(job, ("PENDING",), timeout=120)
    time.sleep(5)
    for _ in range(
        30
    ):  # refused at times while the old incarnation completes: then Slurm's delay it is
        update = cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        if update.returncode == 0 or cluster.state(job) != "PENDING":
            return
        time.sleep(1)
    print(
        f"scontrol update {job} StartTime=now refused ({update.stderr.strip()}): Slurm starts it "
        "after its delay"
    )


def test_a_job_stopped_by_its_signal_before_its_time_limit_requeues_itself_and_continues_bitwise(
    cluster, files, tmp_path
):
    """--time 1 minute, --signal B:USR1@59: Slurm sends USR1 to the script well before the limit;
    the script passes it to train.py, which saves last/ and exits, and requeues the job, which
    continues."""
    data, whole = files
    outdir = tmp_path / "model"
    job = cluster.sbatch(
        TREE / "configs" / "slurm" / "cpu.sbatch",
        *data,
        *OPTIONS,
        "--outdir",
        outdir,
        cwd=TREE,
        env=job_env(),
        options=["--output", tmp_path / "job.out", "--time", "00:01:00", "--signal", "B:USR1@59"],
    )
    deadline = time.monotonic() + 600
    while (state := cluster.state(job)) != "COMPLETED":
        assert state in ("PENDING", "RUNNING", "COMPLETING") and time.monotonic() < deadline, state
        if state == "PENDING" and (outdir / "last").is_dir():  # requeued by the script
            start_again(cluster, job)
        time.sleep(0.5)
    log = (tmp_path / "job.out").read_text()
    assert (
        "Stopped by signal 10 after" in log
        and f"--resume auto: continuing {outdir / 'last'} (step " in log
    )
    assert (
        int(cluster.run("scontrol", "show", "job", job).stdout.split("Restarts=")[1].split()[0])
        >= 1
    )
    assert_same_run(outdir, whole)
