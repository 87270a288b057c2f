"""Steps as well as epochs: validation every --eval_steps (best/ and early stopping by validation),
a run --max_steps long, throughput in log.json, a signal during validation, and checkpoints from
before "Step" entries.

    python -m pytest -q tests/template/test_steps_and_validation.py            # + -m slow
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import (
    TREE,
    assert_bitwise_equal,
    data_args,
    fork,
    launch,
    read_json,
    read_log,
    run,
)
from core import checkpoint

STEPS_PER_EPOCH = 20  # 320 rows at --batch_size 16


def args_of(tiny_data, *more):
    model = ["--model_name_or_path", TREE / "assets" / "tiny-bert", "--batch_size", 16]
    return [*data_args(tiny_data), *model, *more]


def validations(log):
    """[(step, valid_log)] of the "Step N" validations in log.json, in order."""
    return [
        (int(key.split()[1]), entry["valid_log"])
        for key, entry in log.items()
        if key.startswith("Step ") and "valid_log" in entry
    ]


def test_validation_every_n_steps_changes_no_weight_and_keeps_the_epoch_entries(
    tiny_data, tmp_path
):
    run(*args_of(tiny_data, "--epochs", 2), "--outdir", tmp_path / "epochs")
    run(*args_of(tiny_data, "--epochs", 2, "--eval_steps", 6), "--outdir", tmp_path / "steps")
    assert_bitwise_equal(tmp_path / "epochs" / "last", tmp_path / "steps" / "last")
    by_epoch, by_steps = (read_json(tmp_path / name / "log.json") for name in ("epochs", "steps"))
    assert [step for step, _ in validations(by_steps)] == [6, 12, 18, 24, 30, 36, 40]
    assert validations(by_epoch) == []  # validation at the epochs' ends, as ever
    for epoch in (0, 1):
        assert set(by_epoch[f"Epoch {epoch}"]) == {"train_log", "valid_log"}
        assert by_steps[f"Epoch {epoch}"] == {"train_log": by_epoch[f"Epoch {epoch}"]["train_log"]}
    # The last validation of both is at step 40 on the same weights.
    assert by_steps["Step 40"]["valid_log"] == by_epoch["Epoch 1"]["valid_log"]
    # Every --log_every (10) steps: the loss since the last log and the throughput.
    logged = [key for key, entry in by_epoch.items() if "train_log" in entry and "Step" in key]
    assert logged == ["Step 10", "Step 20", "Step 30", "Step 40"]
    train_log = by_epoch["Step 10"]["train_log"]
    assert train_log["samples_per_second"] > 0 and train_log["tokens_per_second"] > 0
    # Tokens per sample: the padded batches' real tokens, between 3 ([CLS] x [SEP]) and --max_len.
    assert 3 < train_log["tokens_per_second"] / train_log["samples_per_second"] < 128


def replay(values, patience, greater):
    """The step at which early stopping ends the run, and the best validation's step."""
    best, best_step, bad = None, None, 0
    for step, value in values:
        if best is None or (value > best if greater else value < best):
            best, best_step, bad = value, step, 0
        else:
            bad += 1
        if bad >= patience:
            return step, best_step
    return None, best_step


def test_early_stopping_by_validations_ends_there_and_best_holds_the_best_validation(
    tiny_data, tmp_path
):
    # "Best" = the highest valid loss: the loss falls, so the first validations are the best.
    more = ["--eval_steps", 3, "--epochs", 3, "--early_stopping_patience", 2, "--greater_is_better"]
    outdir = tmp_path / "model"
    result = run(*args_of(tiny_data, *more), "--outdir", outdir)
    log = read_log(outdir / "log.json")
    losses = [(step, valid["loss"]) for step, valid in validations(log)]
    stopped, best = replay(losses, patience=2, greater=True)
    assert stopped is not None and stopped < 3 * STEPS_PER_EPOCH
    assert losses[-1][0] == stopped  # nothing validated after it
    assert "Early stopping: valid loss has not improved" in result.stdout
    state = read_json(outdir / "last" / "trainer_state.json")
    assert state["global_step"] == stopped and state["bad_epochs"] == 2
    assert read_json(outdir / "best" / "trainer_state.json")["global_step"] == best
    # best/ holds the weights of that validation: those of a run stopped there.
    run(*args_of(tiny_data, *more, "--stop_after_steps", best), "--outdir", tmp_path / "at_best")
    assert_bitwise_equal(tmp_path / "at_best" / "last", outdir / "best")
    # Run again, it is finished.
    again = run("--resume", outdir / "last")
    assert "the run is finished (early stopping: 2 validations without a better value)" in (
        again.stdout
    )
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == stopped


def test_max_steps_is_the_run_length_the_schedule_and_the_last_validation(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    args = args_of(tiny_data, "--max_steps", 25, "--epochs", 1)  # --max_steps overrides --epochs
    run(*args, "--outdir", outdir)
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["global_step"], state["epoch"], state["steps_done_in_epoch"]) == (25, 1, 5)
    log = read_log(outdir / "log.json")
    assert "Epoch 0" in log and "Epoch 1" not in log  # the second epoch was cut short at step 25
    assert log["Step 25"]["train_log"]["lr"] == 0.0  # linear: 0 at step N exactly
    assert log["Epoch 0"]["train_log"]["lr"] > 0.0
    assert validations(log)[-1][0] == 25  # the last step validates
    assert (outdir / "best").is_dir()

    again = run("--resume", outdir / "last")
    assert "the run is finished (step 25 of --max_steps 25); nothing to do" in again.stdout
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == 25
    # A larger budget goes on (a warm restart: the schedule now spans 30 steps).
    run("--resume", outdir / "last", "--max_steps", 30)
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == 30
    assert read_log(outdir / "log.json")["Step 30"]["train_log"]["lr"] == 0.0


def test_a_max_steps_run_stopped_and_resumed_is_bitwise_the_uninterrupted_one(tiny_data, tmp_path):
    args = args_of(tiny_data, "--max_steps", 27, "--eval_steps", 8)
    run(*args, "--outdir", tmp_path / "whole")
    run(*args, "--outdir", tmp_path / "stopped", "--stop_after_steps", 13)
    run("--resume", tmp_path / "stopped" / "last")
    for name in ("last", "best"):
        assert_bitwise_equal(tmp_path / "whole" / name, tmp_path / "stopped" / name)
    whole, stopped = (read_log(tmp_path / n / "log.json") for n in ("whole", "stopped"))
    assert whole == stopped
    assert [step for step, _ in validations(whole)] == [8, 16, 24, 27]


def test_a_checkpoint_saved_before_step_entries_resumes_bitwise(tiny_data, tmp_path):
    """Today's format: loss_sums of 2 numbers a process, a log of "Epoch N" entries only."""
    args = args_of(tiny_data, "--epochs", 2, "--save_steps", 7)
    run(*args, "--outdir", tmp_path / "whole")
    run(*args, "--outdir", tmp_path / "old", "--stop_after_steps", 27)
    last = tmp_path / "old" / "last"
    state = read_json(last / "trainer_state.json")
    state["loss_sums"] = [sums[:2] for sums in state["loss_sums"]]
    state["log"] = {k: v for k, v in state["log"].items() if k.startswith("Epoch ")}
    checkpoint.write_json(last / "trainer_state.json", state)
    manifest = read_json(last / "manifest.json")
    manifest["files"]["trainer_state.json"] = checkpoint.sha256(last / "trainer_state.json")
    checkpoint.write_json(last / "manifest.json", manifest)
    (tmp_path / "old" / "log.json").write_text(json.dumps(state["log"]))

    run("--resume", last)
    assert_bitwise_equal(tmp_path / "whole" / "last", last)
    whole, old = (read_log(tmp_path / n / "log.json") for n in ("whole", "old"))
    epochs = [key for key in whole if key.startswith("Epoch ")]
    assert {k: whole[k] for k in epochs} == {k: old[k] for k in epochs}


# ---------------------------------------------------------------- signals (slow)

# A metric that takes its time: each validation batch sleeps, and says that validation is going on.
SLOW_METRIC = """
import os as _os
import time as _time

_metric_inputs, _calls = metric_inputs, [0]


def metric_inputs(model, tokenizer, batch, outputs):
    _calls[0] += 1
    if _calls[0] > 1:  # not the check before step 1
        open(_os.environ["VALIDATING"], "a").close()
        _time.sleep(0.5)
    return _metric_inputs(model, tokenizer, batch, outputs)
"""


def start(tree, args, processes, env):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else []),
               "train.py", *map(str, args)]  # fmt: skip
    env = {**os.environ, **env, **({"ACCELERATE_USE_CPU": "1"} if processes > 1 else {})}
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen(command, cwd=tree, env=env, start_new_session=True, **output)


def wait_for(path, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared:\n{process.communicate()[0][-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_signal_during_validation_stops_right_after_it_and_resumes_bitwise(
    processes, tiny_data, tmp_path
):
    per_process = ["--batch_size", 16 // processes]
    args = [*args_of(tiny_data, "--epochs", 1, "--eval_steps", 6), *per_process]
    whole = run(*args, "--outdir", tmp_path / "whole", processes=processes)
    assert whole.returncode == 0
    tree = fork(tmp_path, {"modeling.py": {"": SLOW_METRIC}})
    outdir, validating = tmp_path / "model", tmp_path / "validating"
    process = start(tree, [*args, "--outdir", outdir], processes, {"VALIDATING": str(validating)})
    wait_for(validating, process)  # the validation at step 6 has begun
    os.killpg(process.pid, signal.SIGTERM)  # every process of the job, as Slurm does
    output, _ = process.communicate(timeout=180)
    # 143 = 128 + SIGTERM from train.py; a launcher signalled too dies by it (-15), or torchrun's
    # agent says so and exits 1.
    assert process.returncode in (143, -signal.SIGTERM, 1), output[-3000:]
    assert f"Stopped by signal {int(signal.SIGTERM)} after 6 optimizer steps" in output
    state = read_json(outdir / "last" / "trainer_state.json")
    assert state["global_step"] == 6  # acted on right after the validation, not steps later
    assert "valid_log" in read_log(outdir / "log.json")["Step 6"]

    run("--resume", outdir / "last", processes=processes)
    for name in ("last", "best"):
        assert_bitwise_equal(tmp_path / "whole" / name, outdir / name)
    assert read_log(tmp_path / "whole" / "log.json") == read_log(outdir / "log.json")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_killed_after_a_mid_epoch_validation_save_resumes_bitwise(processes, tiny_data, tmp_path):
    per_process = ["--batch_size", 16 // processes]
    args = [*args_of(tiny_data, "--epochs", 2, "--eval_steps", 7), *per_process]
    run(*args, "--outdir", tmp_path / "whole", processes=processes)
    outdir = tmp_path / "model"
    process = start(TREE, [*args, "--outdir", outdir], processes, {})
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        try:
            if read_json(outdir / "last" / "manifest.json")["global_step"] >= 14:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] in (14, 20, 21)
    run("--resume", outdir / "last", processes=processes)
    for name in ("last", "best"):
        assert_bitwise_equal(tmp_path / "whole" / name, outdir / name)
    assert read_log(tmp_path / "whole" / "log.json") == read_log(outdir / "log.json")
    assert load_file(outdir / "best" / "model.safetensors").keys()


# The pinned pair with a loss over labelled examples only: the first UNLABELLED validation rows get
# label -100 (dataset.py), and loss_items() counts 1 for a labelled example, 0 for the others.
UNLABELLED = {
    "dataset.py": {
        '            encoded["labels"] = [label_ids[name] for name in names]\n': (
            '            encoded["labels"] = [\n'
            '                -100 if split == "validation" and i < unlabelled else label_ids[n]\n'
            "                for i, n in zip(indices, names)\n"
            "            ]\n"
        ),
        "    def encode(batch, indices):\n": (
            '    unlabelled = int(os.environ.get("UNLABELLED", 0))\n\n'
            "    def encode(batch, indices):\n"
        ),
        "": "import os  # noqa: E402\n",
    },
    "modeling.py": {
        "": '\n\ndef loss_items(batch):\n    return (batch["labels"] != -100).long()\n'
    },
}


def test_a_validation_batch_without_loss_items_weighs_nothing(tiny_data, tmp_path):
    """A validation batch whose every label is -100 (its mean loss is NaN) weighs 0, as it does in
    training: the valid loss is the one of the labelled examples alone (those rows left out of the
    file give the same figure), and best/ follows it. With no item in the whole validation set:
    one line, a NaN loss that never becomes best/."""
    tree = fork(tmp_path, UNLABELLED)
    (tmp_path / "rest").mkdir()
    rest = tmp_path / "rest" / "valid.jsonl"
    rest.write_text("".join((tiny_data / "valid.jsonl").read_text().splitlines(True)[16:]))

    def losses(valid, outdir, unlabelled):
        args = [*args_of(tiny_data, "--epochs", 2, "--outdir", tmp_path / outdir)]
        args[args.index("--valid_file") + 1] = valid
        result = launch(*args, cwd=tree, env={"UNLABELLED": str(unlabelled)})
        return result, [
            entry["valid_log"]["loss"]
            for entry in read_log(tmp_path / outdir / "log.json").values()
            if "valid_log" in entry
        ]

    _, masked = losses(tiny_data / "valid.jsonl", "masked", 16)  # the first batch: no item
    _, dropped = losses(rest, "dropped", 0)
    assert len(masked) == 2 and all(abs(a - b) < 1e-6 for a, b in zip(masked, dropped)), (
        masked,
        dropped,
    )
    assert (tmp_path / "masked" / "best").is_dir()

    result, none = losses(tiny_data / "valid.jsonl", "none", 64)
    said = [line for line in result.stdout.splitlines() if "no example of the validation" in line]
    assert len(said) == 2 and said[0].startswith(
        "[Epoch 0] [VALID]: no example of the validation set has a loss item"
    ), result.stdout[-2000:]
    assert all(math.isnan(loss) for loss in none) and not (tmp_path / "none" / "best").exists()
