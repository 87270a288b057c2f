"""Exact resume: a run stopped at an epoch end or at a --save_steps checkpoint and resumed ends with
weights bitwise equal to the run that was never stopped, and the same log.json, with 1 process
(with gradient accumulation) and with 2 processes (gloo on CPU).

    pytest tests/template/test_resume.py              # 1 process, in this process
    pytest -m slow tests/template/test_resume.py      # 2 processes under accelerate launch
"""

import json

import pytest

import train
from conftest import (
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    common_args,
    data_args,
    launch,
    read_json,
    run,
    weights,
)


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
    assert read_json(outdir / "log.json") == read_json(ref / "log.json")
    state, expected = (
        read_json(folder / "last" / "trainer_state.json") for folder in (outdir, ref)
    )
    assert (
        state.pop("run_id") != expected.pop("run_id") and state == expected
    )  # two runs, the same state


@pytest.mark.slow
def test_schedule_is_the_same_for_1_and_2_processes_and_accumulation(reference):
    """Same global batch three ways (1 process x accumulation 2, 2 processes): the same lr per epoch."""
    logs = [read_json(reference(p) / "log.json") for p in (1, 2)]
    lrs = [[entry["train_log"]["lr"] for entry in log.values()] for log in logs]
    assert lrs[0] == pytest.approx([1e-3 * 20 / 35, 0.0], rel=1e-9)
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-9)


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
    """Elastic resume: 1 process x accumulation 2 <-> 2 processes x 1. From the stop on, every optimizer
    step takes exactly the examples the uninterrupted run's step took; the weights differ only by
    float sums and dropout draws (process 1 has no RNG state to restore when it was not there)."""
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
        f"resuming on {after} process(es) instead of {before}: --accumulation {3 - before} -> {3 - after}"
        in result.stderr
    )
    assert recorded(tmp_path / "resumed", after) == whole[13:]
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["global_step"], state["num_processes"]) == (40, after)
    assert read_json(outdir / "last" / "my_config.json")["accumulation"] == 3 - after
    lrs = [entry["train_log"]["lr"] for entry in read_json(outdir / "log.json").values()]
    assert lrs == pytest.approx(
        [1e-3 * 20 / 35, 0.0], rel=1e-9
    )  # the schedule went on where it was
    # The tolerance: how far the two uninterrupted runs (1 and 2 processes, the same examples at every
    # step, other dropout draws) end apart. The resumed run must end no farther from either.
    runs_apart = relative_difference(tmp_path / "whole1" / "last", tmp_path / "whole2" / "last")
    resumed = [
        relative_difference(outdir / "last", tmp_path / f"whole{p}" / "last")
        for p in (before, after)
    ]
    print(
        f"relative weight difference: 1 vs 2 processes uninterrupted {runs_apart:.2e}; resumed {before}->{after} "
        f"vs uninterrupted on {before}: {resumed[0]:.2e}, on {after}: {resumed[1]:.2e}"
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


def test_best_is_not_replaced_by_a_worse_model_after_resume(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), "--outdir", outdir, "--epochs", 2, "--lr", 3e-3, "--batch_size", 16)
    best_before = {p.name: p.read_bytes() for p in (outdir / "best").iterdir()}
    # Validate the resumed epoch with every label moved to another class: its loss is certainly worse.
    rotate = {"negative": "neutral", "neutral": "positive", "positive": "negative"}
    rows = [json.loads(line) for line in (tiny_data / "valid.jsonl").read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text(
        "".join(json.dumps({**row, "label": rotate[row["label"]]}) + "\n" for row in rows)
    )
    run("--resume", outdir / "last", "--epochs", 3, "--valid_file", flipped)
    log = read_json(outdir / "log.json")
    assert log["Epoch 2"]["valid_log"]["loss"] > max(
        log["Epoch 0"]["valid_log"]["loss"], log["Epoch 1"]["valid_log"]["loss"]
    )
    assert {p.name: p.read_bytes() for p in (outdir / "best").iterdir()} == best_before
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 3


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
    assert read_json(outdir / "log.json") == read_json(reference(1) / "log.json")

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
