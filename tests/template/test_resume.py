"""Resume: is this the same run, and where does it continue.

A run stopped and resumed ends bitwise equal to the run never stopped (1 and 2 processes, bf16,
--group_by_length); --resume auto; another number of processes; the options that must match; the
training data's fingerprint; the outdir, which holds one run, locked while it runs.

    python -m pytest -q tests/template/test_resume.py
    python -m pytest -q -m slow tests/template/test_resume.py    # 2 processes, elastic, bf16
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import (
    FAST,
    STEPS_PER_EPOCH,
    TREE,
    assert_bitwise_equal,
    common_args,
    data_args,
    epochs,
    fork,
    launch,
    python_train,
    quick_run,
    read_json,
    read_log,
    refused,
    run,
    snapshot,
    stopped_and_resumed,
    weights,
)
from core import checkpoint, options

# ---------------------------------------------------------------- bitwise the run never stopped


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "stop", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7], ids=["epoch-end", "save-steps-in-epoch-1"]
)
def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(
    processes, stop, tiny_data, reference, tmp_path
):
    ref = reference(processes)
    outdir = tmp_path / "model"
    run(
        *common_args(tiny_data, processes),
        "--outdir",
        outdir,
        "--stop_after_steps",
        stop,
        processes=processes,
    )
    saved = read_json(outdir / "last" / "trainer_state.json")
    assert saved["num_processes"] == processes  # the launch really had that many processes
    assert (saved["global_step"], saved["epoch"], saved["steps_done_in_epoch"]) == (
        stop,
        1,
        stop - STEPS_PER_EPOCH,
    )
    assert sorted(p.name for p in (outdir / "last").glob("rng_state_*")) == [
        f"rng_state_{rank}.safetensors" for rank in range(processes)
    ]

    result = run(
        "--resume", outdir / "last", processes=processes
    )  # every other option from my_config.json
    assert "Epoch 1" in result.stdout
    assert_bitwise_equal(ref / "last", outdir / "last")
    assert_bitwise_equal(ref / "best", outdir / "best")
    assert read_log(outdir / "log.json") == read_log(ref / "log.json")
    state, expected = (
        read_json(folder / "last" / "trainer_state.json") for folder in (outdir, ref)
    )
    state["log"], expected["log"] = (
        read_log(f / "last" / "trainer_state.json") for f in (outdir, ref)
    )
    # Two runs, the same state (but the throughput figures, measured).
    assert state.pop("run_id") != expected.pop("run_id") and state == expected


@pytest.mark.slow
def test_group_by_length_with_two_processes_resumes_bitwise(tiny_data, reference, tmp_path):
    args = [*common_args(tiny_data, 2), "--group_by_length"]
    run(*args, "--outdir", tmp_path / "whole", processes=2)
    stopped_and_resumed(args, tmp_path / "resumed", STEPS_PER_EPOCH + 7, processes=2)
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "resumed" / "last")
    assert read_log(tmp_path / "resumed" / "log.json") == read_log(tmp_path / "whole" / "log.json")
    grouped, shuffled = weights(tmp_path / "whole" / "last"), weights(reference(2) / "last")
    assert not torch.equal(
        grouped["head.weight"], shuffled["head.weight"]
    )  # another batch order was used
    log = read_log(tmp_path / "whole" / "log.json")
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]


@pytest.mark.slow
def test_bf16_on_a_cpu_trains_saves_and_resumes_bitwise(tiny_data, tmp_path):
    args = [*data_args(tiny_data), "--mixed_precision", "bf16", "--epochs", 1, "--batch_size", 16]
    python_train(*args, "--outdir", tmp_path / "whole")
    python_train(*args, "--outdir", tmp_path / "stopped", "--stop_after_steps", 9)
    python_train("--resume", tmp_path / "stopped" / "last")
    assert read_json(tmp_path / "whole" / "last" / "my_config.json")["mixed_precision"] == "bf16"
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "stopped" / "last")
    assert read_log(tmp_path / "whole" / "log.json") == read_log(tmp_path / "stopped" / "log.json")


def test_best_is_not_replaced_by_a_worse_model_after_resume(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), "--outdir", outdir, "--epochs", 2, "--lr", 3e-3, "--batch_size", 16)
    best_before = {p.name: p.read_bytes() for p in (outdir / "best").iterdir()}
    # Validate the resumed epoch with every label moved to another class: its loss is certainly
    # worse.
    rotate = {"negative": "neutral", "neutral": "positive", "positive": "negative"}
    rows = [json.loads(line) for line in (tiny_data / "valid.jsonl").read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text(
        "".join(json.dumps({**row, "label": rotate[row["label"]]}) + "\n" for row in rows)
    )
    run("--resume", outdir / "last", "--epochs", 3, "--valid_file", flipped)
    log = read_log(outdir / "log.json")
    assert log["Epoch 2"]["valid_log"]["loss"] > max(
        log["Epoch 0"]["valid_log"]["loss"], log["Epoch 1"]["valid_log"]["loss"]
    )
    assert {p.name: p.read_bytes() for p in (outdir / "best").iterdir()} == best_before
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 3


# ---------------------------------------------------------------- --resume auto


def test_resume_auto_starts_a_run_continues_it_and_leaves_it_alone_once_finished(
    tiny_data, reference, tmp_path
):
    """The same command, run again (a requeued job, a restarted worker): --resume auto starts a new
    run, continues it from OUTDIR/last, and once the run is finished changes nothing."""
    outdir = tmp_path / "model"
    command = [*common_args(tiny_data, 1), "--outdir", outdir, "--resume", "auto"]
    first = run(*command, "--stop_after_steps", STEPS_PER_EPOCH + 7)  # stopped, as by a time limit
    assert f"--resume auto: {outdir} holds no checkpoint: a new run." in first.stderr
    second = run(*command)
    assert (
        f"--resume auto: continuing {outdir / 'last'} (step {STEPS_PER_EPOCH + 7})."
        in second.stderr
    )
    assert_bitwise_equal(reference(1) / "last", outdir / "last")
    assert read_log(outdir / "log.json") == read_log(reference(1) / "log.json")

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outdir.rglob("*") if p.is_file()}
    third = run(*command)
    assert (
        f"{outdir / 'last'}: the run is finished (epoch 2 of --epochs 2); nothing to do"
        in third.stdout
    )
    assert {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outdir.rglob("*") if p.is_file()
    } == before
    with pytest.raises(
        SystemExit, match="--lr 0.0005 differs from"
    ):  # not the same options: refused
        train.main([str(a) for a in [*command, "--lr", 5e-4, "--epochs", 3]])


# ---------------------------------------------------------------- another number of processes


def recorded(prefix, processes):
    """Per optimizer step, the examples it took on all processes together (see tests/record.py)."""
    per_rank = [read_json(f"{prefix}.{rank}.json") for rank in range(processes)]
    return [sorted(sum((steps[k] for steps in per_rank), [])) for k in range(len(per_rank[0]))]


def relative_difference(a, b):
    """|a - b| / |b| over all the weights together."""
    wa, wb = weights(a), weights(b)
    return (
        (sum((wa[k] - wb[k]).pow(2).sum() for k in wa) / sum(wb[k].pow(2).sum() for k in wb))
        .sqrt()
        .item()
    )


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_another_number_of_processes_takes_the_same_examples_per_step(
    before, after, tiny_data, tmp_path
):
    """Elastic resume: 1 process x accumulation 2 <-> 2 processes x 1. From the stop on, every
    optimizer step takes exactly the examples the uninterrupted run's step took; the weights differ
    only by float sums and dropout draws (process 1 has no RNG state to restore when it was not
    there)."""
    args = [*data_args(tiny_data), "--epochs", 2, "--num_warmup_steps", 5, "--batch_size", 8]
    for processes in (before, after):  # both uninterrupted runs: the same examples at every step
        launch(
            *args,
            "--accumulation",
            3 - processes,
            "--outdir",
            tmp_path / f"whole{processes}",
            processes=processes,
            script="tests/record.py",
            env={"RECORD": str(tmp_path / f"whole{processes}")},
        )
    whole = recorded(tmp_path / f"whole{before}", before)
    assert len(whole) == 2 * STEPS_PER_EPOCH and whole == recorded(
        tmp_path / f"whole{after}", after
    )

    outdir = tmp_path / "model"
    launch(
        *args,
        "--accumulation",
        3 - before,
        "--outdir",
        outdir,
        "--stop_after_steps",
        13,
        processes=before,
    )
    result = launch(
        "--resume",
        outdir / "last",
        processes=after,
        script="tests/record.py",
        env={"RECORD": str(tmp_path / "resumed")},
    )
    assert (
        f"resuming on {after} process(es) instead of {before}: --accumulation {3 - before} -> "
        f"{3 - after}" in result.stderr
    )
    assert recorded(tmp_path / "resumed", after) == whole[13:]
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["global_step"], state["num_processes"]) == (40, after)
    assert read_json(outdir / "last" / "my_config.json")["accumulation"] == 3 - after
    lrs = [entry["train_log"]["lr"] for entry in epochs(read_log(outdir / "log.json")).values()]
    assert lrs == pytest.approx(
        [1e-3 * 20 / 35, 0.0], rel=1e-9
    )  # the schedule went on where it was
    # The tolerance: how far the two uninterrupted runs (1 and 2 processes, the same examples at
    # every step, other dropout draws) end apart. The resumed run must end no farther from either.
    runs_apart = relative_difference(tmp_path / "whole1" / "last", tmp_path / "whole2" / "last")
    resumed = [
        relative_difference(outdir / "last", tmp_path / f"whole{p}" / "last")
        for p in (before, after)
    ]
    print(
        f"relative weight difference: 1 vs 2 processes uninterrupted {runs_apart:.2e}; resumed "
        f"{before}->{after} vs uninterrupted on {before}: {resumed[0]:.2e}, on {after}: "
        f"{resumed[1]:.2e}"
    )
    assert max(resumed) <= 1.5 * runs_apart


def test_another_number_of_processes_that_cannot_keep_the_global_batch_is_refused(
    tiny_data, tmp_path, monkeypatch
):
    outdir = tmp_path / "model"
    run(
        *data_args(tiny_data),
        "--batch_size",
        16,
        "--accumulation",
        2,
        "--epochs",
        1,
        "--outdir",
        outdir,
    )
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it for 3 processes
    with pytest.raises(
        SystemExit,
        match=r"saved by 1 process\(es\) x --accumulation 2 = 2 batches per optimizer "
        r"step, which 3 processes cannot share; resume with 1, 2 processes",
    ):
        train.main(["--resume", str(outdir / "last"), "--epochs", "2"])


# ---------------------------------------------------------------- the options that must match


def test_options_that_change_the_numbers_are_refused_or_said_on_resume(
    finished, tiny_data, tmp_path
):
    for option, value in [("--max_grad_norm", "0.5"), ("--mixed_precision", "bf16")]:
        refused(["--resume", finished / "last", option, value], f"{option} {value} differs from")
    other_valid = tmp_path / "valid.jsonl"
    other_valid.write_text(
        "\n".join((tiny_data / "valid.jsonl").read_text().splitlines()[:32]) + "\n"
    )
    err = run("--resume", finished / "last", "--epochs", 2, "--valid_file", other_valid).stderr
    assert (
        "changed on resume: " in err
        and "--epochs 1 -> 2" in err
        and f"--valid_file {tiny_data / 'valid.jsonl'} -> {other_valid}" in err
    )
    assert "changed on resume: the validation data" in err


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


# ---------------------------------------------------------------- the training data's fingerprint


def test_resume_on_changed_training_data_is_refused(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    outdir = tmp_path / "model"
    run(
        *data_args(data),
        "--batch_size",
        32,
        "--epochs",
        2,
        "--outdir",
        outdir,
        "--stop_after_steps",
        3,
    )
    lines = (data / "train.jsonl").read_text().splitlines()
    for changed in (lines[:-1], lines[1:] + lines[:1]):  # a row removed; the rows reordered
        (data / "train.jsonl").write_text("\n".join(changed) + "\n")
        refused(
            ["--resume", outdir / "last"],
            "the training data changed since the checkpoint was saved",
            str(data / "train.jsonl"),
            "--ignore_mismatch",
        )
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")  # back as it was: resumes
    run("--resume", outdir / "last")
    recorded = read_json(outdir / "last" / "trainer_state.json")["data"]["train"]
    assert recorded["rows"] == 320 and recorded["sha256"] == checkpoint.sha256(data / "train.jsonl")


# ------------------------------------------------------ the outdir: one run's, locked while it runs


def test_overwrite_deletes_nothing_until_the_new_run_has_saved(finished, tiny_data):
    before = snapshot(finished)
    # Refused before training, and a run that stops on NaN before its first save: the old run stays
    # whole.
    refused(
        [
            *data_args(tiny_data),
            *FAST,
            "--outdir",
            finished,
            "--overwrite",
            "--metric_for_best",
            "acc",
        ],
        "--metric_for_best acc",
    )
    refused(
        [
            *data_args(tiny_data),
            *FAST,
            "--outdir",
            finished,
            "--overwrite",
            "--lr",
            "1e30",
            "--max_grad_norm",
            "0",
            "--log_every",
            "1",
        ],
        "non-finite gradients",
    )
    assert snapshot(finished) == before
    # A run that saves mid-epoch: its last/ replaces the old one, and the old best/ goes with it.
    run(
        *data_args(tiny_data),
        "--batch_size",
        32,
        "--epochs",
        2,
        "--outdir",
        finished,
        "--overwrite",
        "--stop_after_steps",
        3,
    )
    assert read_json(finished / "last" / "trainer_state.json")["global_step"] == 3
    assert not (finished / "best").exists() and read_log(finished / "log.json") == {}


def test_overwrite_never_deletes_what_the_template_did_not_write(tiny_data, tmp_path):
    outdir = tmp_path / "mine"
    (outdir / "best").mkdir(parents=True)
    (outdir / "best" / "weights.pt").write_bytes(b"my own")
    (outdir / "log.json").write_text('{"notes": "mine"}')
    before = snapshot(outdir)
    message = refused(
        [*data_args(tiny_data), *FAST, "--outdir", outdir, "--overwrite"],
        "holds best, log.json, which this template did not write",
        "never replaces",
    )
    assert "--overwrite" not in message and snapshot(outdir) == before


def test_resume_of_a_copied_checkpoint_writes_beside_it_and_never_into_another_run(
    finished, tiny_data, tmp_path
):
    original = snapshot(finished)
    copy = tmp_path / "copied" / "last"
    shutil.copytree(finished / "last", copy)
    run("--resume", copy, "--epochs", 2)
    assert snapshot(finished) == original  # the outdir recorded in my_config.json is not touched
    assert list(epochs(read_log(tmp_path / "copied" / "log.json"))) == ["Epoch 0", "Epoch 1"]
    other = tmp_path / "other"
    run(*data_args(tiny_data), *FAST, "--outdir", other)
    refused(
        ["--resume", finished / "last", "--epochs", 2, "--outdir", other],
        f"--outdir {other} holds another run",
    )


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from core import resume
resume.lock_outdir({outdir!r})
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_second_run_into_a_busy_outdir_is_refused_and_a_stale_lock_taken_over(
    extra, tiny_data, tmp_path
):
    outdir = tmp_path / "model"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(TREE), outdir=str(outdir))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(
            [*data_args(tiny_data), *FAST, "--outdir", outdir, *extra],
            f"--outdir {outdir} is in use by another run (pid {holder.pid} on ",
        )
    finally:
        holder.kill()
        holder.wait()
    assert (
        (outdir / ".lock").read_text().startswith(f"pid {holder.pid}")
    )  # left behind by the dead holder
    quick_run(tiny_data, tmp_path, *extra)  # stale: taken over
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 1


# The forked pair for two incarnations of one run: SLOW seconds a forward; with HOLD=PATH,
# build_model() touches PATH.waiting and waits for PATH (the test decides when it goes on).
INCARNATIONS = {
    "modeling.py": {
        "        pooled = self.encoder": "        import os, time\n"
        "        time.sleep(float(os.environ.get('SLOW', 0)))\n"
        "        pooled = self.encoder",
        "    labels = train_set.labels\n": "    labels = train_set.labels\n"
        "    import os, pathlib, time\n"
        "    if os.environ.get('HOLD'):\n"
        "        pathlib.Path(os.environ['HOLD'] + '.waiting').touch()\n"
        "        while not os.path.exists(os.environ['HOLD']):\n"
        "            time.sleep(0.05)\n",
    }
}


def test_two_overlapping_incarnations_of_resume_auto_never_mix_their_positions(tiny_data, tmp_path):
    """A job submitted twice: the second incarnation reads the position while the first still
    trains; the first saves once more (SIGTERM) and ends while the second loads. Under the outdir's
    lock the second finds the position changed and is refused in one line, never resumed at a
    stale position; run again, the command continues from the newer save."""
    tree, outdir, hold = fork(tmp_path, INCARNATIONS), tmp_path / "model", tmp_path / "hold"
    args = [*map(str, data_args(tiny_data)), "--batch_size", "32", "--epochs", "10"]
    args += ["--model_name_or_path", str(TREE / "assets" / "tiny-bert")]
    args += ["--outdir", str(outdir)]

    def start(*extra, **env):
        return subprocess.Popen(
            [sys.executable, "train.py", *args, *extra],
            cwd=tree,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = start("--stop_after_steps", "3")
    assert first.wait(timeout=240) == 0, first.stdout.read()[-3000:]
    first = start("--resume", "auto", SLOW="1")  # trains on, a step a second
    second = None
    try:
        deadline = time.monotonic() + 120
        while "--resume auto" not in (outdir / ".lock").read_text():  # it holds the outdir
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        second = start("--resume", "auto", HOLD=str(hold))
        while second.poll() is None and not Path(f"{hold}.waiting").exists():
            assert time.monotonic() < deadline, "the second incarnation neither waited nor ended"
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)  # it finishes its step, saves last/ and ends
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, first.stdout.read()[-3000:]
        hold.touch()
        assert second.wait(timeout=240) != 0
        said = second.stdout.read()
    finally:
        for process in (first, second):
            if process and process.poll() is None:
                process.kill()
    saved = read_json(outdir / "last" / "trainer_state.json")["global_step"]
    assert saved > 3  # the first incarnation's last save, which nothing overwrote
    assert said.strip().splitlines()[-1] == (
        f"error: --resume {outdir}/last: saved again (step 3 -> {saved}) by another run into the "
        f"same folder after this one had read it (the same job started twice?). Nothing was done; "
        f"run the command again to continue from step {saved}."
    )
    # The command run again continues the saved position exactly where the first left off.
    again = start("--resume", "auto")
    assert again.wait(timeout=240) == 0, again.stdout.read()[-3000:]
    log = read_log(outdir / "log.json")
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == 100
    assert list(epochs(log)) == [f"Epoch {i}" for i in range(10)]


def test_an_outdir_that_is_a_file_is_refused_before_anything(tmp_path):
    (tmp_path / "model").write_text("a file")
    refused(["--outdir", tmp_path / "model"], "is a file; give a folder")


def test_an_outdir_path_too_long_is_one_line_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("the data was read first"))
    refused(
        [*data_args(tiny_data), "--outdir", tmp_path / ("d" * 300)],
        "cannot write there (File name too long)",
    )
    deep = tmp_path.joinpath(*["d" * 200] * 25)  # each name fits, the path does not
    refused([*data_args(tiny_data), "--outdir", deep], "cannot write there")
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only bind mount of itself (root can make one; else the test is
    skipped)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = (
        subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    )
    if (
        mounted
        and subprocess.run(
            ["mount", "-o", "remount,ro,bind", folder, folder], capture_output=True
        ).returncode
    ):
        subprocess.run(["umount", folder])
        mounted = False
    if not mounted:
        pytest.skip("no read-only bind mount here (needs root)")
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_a_read_only_outdir_is_one_line_before_any_work(read_only, tiny_data, monkeypatch):
    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("the data was read first"))
    refused(
        [*data_args(tiny_data), "--outdir", read_only / "model"],
        "cannot write there (Read-only file system)",
    )
    refused(
        [*data_args(tiny_data), "--outdir", read_only], "cannot write there (Read-only file system)"
    )


@pytest.mark.parametrize("resume", ["auto", "model/last"])
def test_resume_and_overwrite_together_are_refused_in_one_line(resume, tiny_data, tmp_path):
    """One continues the run in --outdir, the other replaces it: neither is dropped silently."""
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path, "--resume", resume, "--overwrite"],
        f"--resume {resume} and --overwrite together",
        "Give one of them.",
    )
    assert not any(tmp_path.iterdir())


def test_resume_auto_of_a_finished_run_with_other_training_data_is_refused(tiny_data, tmp_path):
    """Another task's finished run in --outdir: not "finished; nothing to do" (exit 0)."""
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), *FAST, "--outdir", outdir)
    other = tmp_path / "other.jsonl"
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")  # the same rows, another file
    refused(
        ["--train_file", other, "--outdir", outdir, "--resume", "auto"],
        f"--resume {outdir / 'last'}: the training data changed since the checkpoint was saved: "
        f"{other} is not the file",
    )
    assert "finished" in run("--outdir", outdir, "--resume", "auto").stdout  # its own data
