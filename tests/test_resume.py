"""Exact resume: a run stopped at an epoch end or at a --save_steps checkpoint and resumed ends with
weights bitwise equal to the run that was never stopped, and the same log.json, with 1 process
(with gradient accumulation) and with 2 processes (gloo on CPU).

    pytest tests/test_resume.py              # 1 process, in this process
    pytest -m slow tests/test_resume.py      # 2 processes under accelerate launch
"""
import json

import pytest

from conftest import STEPS_PER_EPOCH, assert_bitwise_equal, common_args, data_args, launch, read_json, run


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("stop", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 7], ids=["epoch-end", "save-steps-in-epoch-1"])
def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(processes, stop, tiny_data, reference, tmp_path):
    ref = reference(processes)
    outdir = tmp_path / "model"
    run(*common_args(tiny_data, processes), "--outdir", outdir, "--stop_after_steps", stop, processes=processes)
    saved = read_json(outdir / "last" / "trainer_state.json")
    assert saved["num_processes"] == processes  # the launch really had that many processes
    assert (saved["global_step"], saved["epoch"], saved["steps_done_in_epoch"]) == (stop, 1, stop - STEPS_PER_EPOCH)
    assert sorted(p.name for p in (outdir / "last").glob("rng_state_*")) == [
        f"rng_state_{rank}.safetensors" for rank in range(processes)]

    result = run("--resume", outdir / "last", processes=processes)  # every other option from my_config.json
    assert "Epoch 1" in result.stdout
    assert_bitwise_equal(ref / "last", outdir / "last")
    assert_bitwise_equal(ref / "best", outdir / "best")
    assert read_json(outdir / "log.json") == read_json(ref / "log.json")
    state, expected = (read_json(folder / "last" / "trainer_state.json") for folder in (outdir, ref))
    assert state.pop("run_id") != expected.pop("run_id") and state == expected  # two runs, the same state


@pytest.mark.slow
def test_schedule_is_the_same_for_1_and_2_processes_and_accumulation(reference):
    """Same global batch three ways (1 process x accumulation 2, 2 processes): the same lr per epoch."""
    logs = [read_json(reference(p) / "log.json") for p in (1, 2)]
    lrs = [[entry["train_log"]["lr"] for entry in log.values()] for log in logs]
    assert lrs[0] == pytest.approx([1e-3 * 20 / 35, 0.0], rel=1e-9)
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-9)


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(reference):
    ref = reference(2)
    before = (ref / "last" / "trainer_state.json").read_bytes()
    result = launch("--resume", ref / "last", "--epochs", 3, processes=1, check=False)
    assert result.returncode != 0
    assert "saved by 2 process(es), resumed with 1" in result.stderr
    assert (ref / "last" / "trainer_state.json").read_bytes() == before


def test_best_is_not_replaced_by_a_worse_model_after_resume(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), "--outdir", outdir, "--epochs", 2, "--lr", 3e-3, "--batch_size", 16)
    best_before = {p.name: p.read_bytes() for p in (outdir / "best").iterdir()}
    # Validate the resumed epoch with every label moved to another class: its loss is certainly worse.
    rotate = {"negative": "neutral", "neutral": "positive", "positive": "negative"}
    rows = [json.loads(line) for line in (tiny_data / "valid.jsonl").read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**row, "label": rotate[row["label"]]}) + "\n" for row in rows))
    run("--resume", outdir / "last", "--epochs", 3, "--valid_file", flipped)
    log = read_json(outdir / "log.json")
    assert log["Epoch 2"]["valid_log"]["loss"] > max(log["Epoch 0"]["valid_log"]["loss"], log["Epoch 1"]["valid_log"]["loss"])
    assert {p.name: p.read_bytes() for p in (outdir / "best").iterdir()} == best_before
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 3
