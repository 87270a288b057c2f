"""A run end to end: outputs, log.json, best/, early stopping, samples, trackers, progress bars.

The shipped task launched once as a user would (the files of best/ and last/, my_config.json,
log.json, the bars, a checkpoint that loads with from_pretrained alone), then runs in this process:
--metric_for_best and its direction, early stopping (both through a resume), samples, trackers,
and the options that change memory or speed but not the run.

    python -m pytest -q tests/template/test_train.py
    python -m pytest -q -m slow tests/template/test_train.py     # 2 processes, torch.compile
"""

import re

import pytest
import torch
from transformers import AutoTokenizer

import train
from conftest import (
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    common_args,
    data_args,
    epochs,
    launch,
    quick_run,
    read_json,
    read_log,
    run,
    stopped_and_resumed,
    tiny_tokenizer,
    weights,
)
from core import check, options

# ------------------------------------------------------- the shipped task, launched as a user would


EPOCHS = 2


FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "lr.bin",
    "my_config.json",
    "optimizer.pt",
    "trainer_state.json",
    "rng_state_0.safetensors",
    "manifest.json",
}


@pytest.fixture(scope="module")
def launched(tiny_data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("e2e") / "model"
    result = launch(
        *data_args(tiny_data),
        "--outdir",
        outdir,
        "--epochs",
        EPOCHS,
        "--batch_size",
        16,
        "--num_warmup_steps",
        5,
    )
    return outdir, result


def test_outputs_and_their_names(launched):
    outdir, _ = launched
    assert {p.name for p in outdir.iterdir()} == {
        "best",
        "last",
        "log.json",
        ".lock",
    }  # .lock: one run at a time
    for checkpoint in ("best", "last"):
        assert {p.name for p in (outdir / checkpoint).iterdir()} == FILES


def test_my_config_holds_every_resolved_option(launched, tiny_data):
    outdir, _ = launched
    saved = read_json(outdir / "last" / "my_config.json")
    assert (
        saved["epochs"] == EPOCHS and saved["batch_size"] == 16 and saved["num_warmup_steps"] == 5
    )
    assert saved["train_file"] == str(tiny_data / "train.jsonl") and saved["outdir"] == str(outdir)
    assert (
        saved["lr_scheduler_type"] == "linear" and saved["seed"] == 42
    )  # defaults are recorded too


def test_log_json_structure_and_learning(launched):
    outdir, _ = launched
    log = read_log(outdir / "log.json")
    assert list(epochs(log)) == [f"Epoch {i}" for i in range(EPOCHS)]
    # Every --log_every (10) optimizer steps of the 20 an epoch: the loss since the last log and
    # the throughput; the epochs' own entries come at their ends.
    steps = [key for key in log if key.startswith("Step ")]
    assert steps == [f"Step {10 * i}" for i in range(1, 2 * EPOCHS + 1)]
    assert list(log).index("Epoch 0") == list(log).index("Step 20") + 1
    with_rates = read_json(outdir / "log.json")
    for key in steps:
        assert set(with_rates[key]) == {"train_log"}
        train_log = with_rates[key]["train_log"]
        assert list(train_log) == ["loss", "lr", "samples_per_second", "tokens_per_second"]
        assert train_log["samples_per_second"] > 0 and train_log["tokens_per_second"] > 0
    for entry in epochs(log).values():
        assert set(entry) == {"train_log", "valid_log"}
        assert set(entry["train_log"]) == {"loss", "lr"} and set(entry["valid_log"]) == {
            "loss",
            "accuracy",
            "macro_f1",
        }
    assert log["Epoch 1"]["train_log"]["loss"] < log["Epoch 0"]["train_log"]["loss"]
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]
    assert with_rates == read_json(outdir / "last" / "trainer_state.json")["log"]


def test_linear_schedule_ends_at_zero(launched):
    outdir, _ = launched
    log = read_log(outdir / "log.json")
    # 20 optimizer steps per epoch, 5 of warmup: after epoch 0 the lr is 1e-3 * (40 - 20) / 35.
    assert log["Epoch 0"]["train_log"]["lr"] == pytest.approx(1e-3 * 20 / 35, rel=1e-9)
    assert log[f"Epoch {EPOCHS - 1}"]["train_log"]["lr"] == 0.0


def test_best_is_the_epoch_with_the_lowest_valid_loss(launched):
    outdir, _ = launched
    log = read_log(outdir / "log.json")
    best_epoch = min(range(EPOCHS), key=lambda i: log[f"Epoch {i}"]["valid_log"]["loss"])
    state = read_json(outdir / "best" / "trainer_state.json")
    assert state["epoch"] == best_epoch + 1
    assert state["best_metric"] == log[f"Epoch {best_epoch}"]["valid_log"]["loss"]


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_checkpoint_loads_with_from_pretrained_alone(launched, tiny_data, checkpoint):
    """What a user does after training: two from_pretrained calls, no train.py."""
    from dataset import generate_dataset
    from modeling import Model

    outdir, _ = launched
    model = Model.from_pretrained(outdir / checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(outdir / checkpoint)
    saved = weights(outdir / checkpoint)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}

    args = options.parse_args([])
    valid = generate_dataset(
        tiny_data / "valid.jsonl", "validation", tokenizer, args, list(model.config.label2id)
    )
    with torch.no_grad():
        batch = valid.collate([valid[i] for i in range(len(valid))])
        predictions = model(**batch).logits.argmax(-1)
    accuracy = (predictions == batch["labels"]).float().mean().item()
    epoch = read_json(outdir / checkpoint / "trainer_state.json")["epoch"] - 1
    assert accuracy == pytest.approx(
        read_log(outdir / "log.json")[f"Epoch {epoch}"]["valid_log"]["accuracy"]
    )


def test_progress_bars_have_the_template_format(launched):
    _, result = launched
    lines = re.split(r"[\r\n]+", result.stderr)
    train = (
        r"\[Epoch 1\] \[TRAIN\]: 100%\|██████████\| 20/20 "
        r"\[\d\d:\d\d<00:00, +[\d.]+it/s, loss=[\d.]+, lr=0, "
        r"samples/s=[\d.e+]+, tokens/s=[\d.e+]+\]"
    )
    valid = (
        r"\[Epoch 0\] \[VALID\]: 100%\|██████████\| 4/4 "
        r"\[\d\d:\d\d<00:00, +[\d.]+it/s, loss=[\d.]+, accuracy=[\d.]+, macro_f1=[\d.]+\]"
    )
    assert any(re.fullmatch(train, line.strip()) for line in lines), (
        "no final TRAIN bar of the expected form"
    )
    assert any(re.fullmatch(valid, line.strip()) for line in lines), (
        "no final VALID bar of the expected form"
    )
    mid = (
        r"\[Epoch 0\] \[TRAIN\]: +\d+%\|.{10}\| \d+/20 \[.*, loss=[\d.]+, lr=[\d.]+(e-\d+)?, "
        r"samples/s=[\d.e+]+, tokens/s=[\d.e+]+\]"
    )
    assert any(re.fullmatch(mid, line.strip()) for line in lines)


# ---------------------------- best/ by --metric_for_best, and early stopping; both through a resume


BATCH_16 = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


def test_metric_for_best_accuracy_decides_best_and_its_value_survives_resume(tiny_data, tmp_path):
    args = [
        *data_args(tiny_data),
        *BATCH_16,
        "--epochs",
        3,
        "--lr",
        3e-3,
        "--metric_for_best",
        "accuracy",
    ]
    run(*args, "--outdir", tmp_path / "whole")
    stopped_and_resumed(args, tmp_path / "resumed", 2 * STEPS_PER_EPOCH)

    log = read_log(tmp_path / "whole" / "log.json")
    accuracies = [entry["valid_log"]["accuracy"] for entry in epochs(log).values()]
    best = read_json(tmp_path / "whole" / "best" / "trainer_state.json")
    assert best["best_metric"] == max(accuracies)
    assert (
        best["epoch"] == accuracies.index(max(accuracies)) + 1
    )  # best/ is that epoch's checkpoint
    assert read_log(tmp_path / "resumed" / "log.json") == log
    assert read_json(tmp_path / "resumed" / "last" / "trainer_state.json")["best_metric"] == max(
        accuracies
    )
    assert_bitwise_equal(tmp_path / "whole" / "best", tmp_path / "resumed" / "best")


@pytest.mark.parametrize(
    "name, greater",
    [
        ("loss", False),
        ("mse", False),
        ("valid_rmse", False),
        ("word_error_rate", False),
        ("perplexity", False),
        ("accuracy", True),
        ("macro_f1", True),
    ],
)
def test_the_direction_of_a_metric_follows_its_name(
    name, greater, monkeypatch, tiny_data, tmp_path, capsys
):
    monkeypatch.setattr(
        train.modeling, "compute_metrics", lambda gathered: {name: 0.5} if name != "loss" else {}
    )
    args = options.parse_args([*map(str, data_args(tiny_data)), "--metric_for_best", name])
    model = train.build_model(
        args.model_name_or_path,
        train.generate_dataset(args.train_file, "train", tiny_tokenizer(), args),
    )
    valid_set = train.generate_dataset(
        args.valid_file, "validation", tiny_tokenizer(), args, ["negative", "neutral", "positive"]
    )
    train_set = train.generate_dataset(args.train_file, "train", tiny_tokenizer(), args)
    hooks = train.modeling
    assert check.first_batch(model, None, train_set, valid_set, args, hooks) is greater
    args.greater_is_better = not greater  # the flag wins
    assert check.first_batch(model, None, train_set, valid_set, args, hooks) is (not greater)


def test_mse_keeps_the_lowest_epoch_in_best(tiny_data, tmp_path, monkeypatch, capfd):
    """A made-up 'mse' that rises every epoch: best/ must stay at epoch 0 (it used to keep the
    worst)."""
    values = iter([0.1, 0.5, 0.9, 0.2, 0.3])
    monkeypatch.setattr(train.modeling, "compute_metrics", lambda gathered: {"mse": next(values)})
    outdir = quick_run(tiny_data, tmp_path, "--metric_for_best", "mse", "--epochs", 3)
    assert "best/ keeps the epoch with the lowest valid mse" in capfd.readouterr().out
    # 0.1 is the one-batch check before training; then 0.5, 0.9, 0.2 for epochs 0, 1, 2
    state = read_json(outdir / "best" / "trainer_state.json")
    assert state["best_metric"] == 0.2 and state["epoch"] == 3
    assert read_json(outdir / "last" / "trainer_state.json")["bad_epochs"] == 0


def test_early_stopping_counter_survives_resume(tiny_data, tmp_path):
    # With --lr 0 the valid loss never improves after epoch 0: patience 2 stops before epoch 3.
    args = [
        *data_args(tiny_data),
        *BATCH_16,
        "--epochs",
        6,
        "--lr",
        0,
        "--early_stopping_patience",
        2,
    ]
    whole = run(*args, "--outdir", tmp_path / "whole")
    assert list(epochs(read_log(tmp_path / "whole" / "log.json"))) == [
        "Epoch 0",
        "Epoch 1",
        "Epoch 2",
    ]
    assert (
        "Early stopping: valid loss has not improved" in whole.stdout
        and "for 2 validations" in whole.stdout
    )
    resumed = stopped_and_resumed(
        args, tmp_path / "resumed", 2 * STEPS_PER_EPOCH
    )  # after epoch 1: 1 bad epoch
    assert list(epochs(read_log(tmp_path / "resumed" / "log.json"))) == [
        "Epoch 0",
        "Epoch 1",
        "Epoch 2",
    ]
    assert "Early stopping" in resumed.stdout
    assert read_json(tmp_path / "resumed" / "last" / "trainer_state.json")["bad_epochs"] == 2


# ---------------------------------------------------------------- samples and trackers


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sample_predictions_change_nothing_in_the_run(processes, tiny_data, reference, tmp_path):
    outdir = tmp_path / "model"
    args = [*common_args(tiny_data, processes), "--sample_every", 6, "--samples", 2]
    first = run(
        *args, "--outdir", outdir, "--stop_after_steps", STEPS_PER_EPOCH + 7, processes=processes
    )
    second = run("--resume", outdir / "last", processes=processes)
    output = first.stdout + second.stdout
    assert re.findall(r"--- samples at step (\d+):", output) == [
        str(s) for s in range(6, 2 * STEPS_PER_EPOCH + 1, 6)
    ]
    shown = re.findall(r"input: .+\n  prediction: (\w+)  gold: (\w+)", output)
    assert len(shown) == 2 * 6 and all(
        gold in ("negative", "neutral", "positive") for _, gold in shown
    )
    assert_bitwise_equal(reference(processes) / "last", outdir / "last")  # the run without samples
    assert read_log(outdir / "log.json") == read_log(reference(processes) / "log.json")


def test_report_to_tensorboard_logs_train_every_n_steps_and_valid_every_epoch(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(
        *data_args(tiny_data),
        *BATCH_16,
        "--epochs",
        2,
        "--log_every",
        8,
        "--report_to",
        "tensorboard",
        "--outdir",
        tmp_path,
    )
    events = EventAccumulator(str(tmp_path / "runs")).Reload()
    # Every --log_every steps and at the last (not at a save between: the windows stay the same
    # whatever stops and resumes the run).
    for name in ("loss", "lr", "samples_per_second", "tokens_per_second"):
        assert [e.step for e in events.Scalars(f"train/{name}")] == [8, 16, 24, 32, 40], name
    log = read_log(tmp_path / "log.json")
    for name in ("loss", "accuracy", "macro_f1"):
        logged = [e.value for e in events.Scalars(f"valid/{name}")]
        assert logged == pytest.approx(
            [log[f"Epoch {i}"]["valid_log"][name] for i in (0, 1)], rel=1e-6
        )


def test_report_to_a_tracker_that_is_not_installed_says_what_to_install(monkeypatch):
    from core import step

    monkeypatch.setattr(step, "get_available_trackers", lambda: [])
    with pytest.raises(
        SystemExit,
        match="--report_to tensorboard: the tensorboard package is not installed. "
        "pip install tensorboard",
    ):
        step.tracker("tensorboard")


# ---------------------------------------------------------------- memory and speed: the same run


def test_gradient_checkpointing_is_bitwise_the_same_run(tiny_data, tmp_path):
    """Recomputing activations in backward (with the dropout masks of the forward pass) changes
    memory, not results."""
    args = [*data_args(tiny_data), *BATCH_16, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "plain")
    run(*args, "--outdir", tmp_path / "checkpointed", "--gradient_checkpointing")
    assert_bitwise_equal(tmp_path / "plain" / "last", tmp_path / "checkpointed" / "last")
    assert (
        read_json(tmp_path / "checkpointed" / "last" / "my_config.json")["gradient_checkpointing"]
        is True
    )


@pytest.mark.slow  # inductor compiles for a few minutes on 2 CPU cores
def test_torch_compile_trains_the_same_model(tiny_data, tmp_path):
    args = [*data_args(tiny_data), *BATCH_16, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "eager")
    run(*args, "--outdir", tmp_path / "compiled", "--torch_compile")
    eager, compiled = weights(tmp_path / "eager" / "last"), weights(tmp_path / "compiled" / "last")
    assert eager.keys() == compiled.keys()  # saved without the compiled wrapper's _orig_mod. prefix
    assert all(eager[k].shape == compiled[k].shape for k in eager)
    # Inductor draws its own dropout masks (torch._inductor.config.fallback_random is off), so the
    # two runs are not the same run; they must still learn the same task about as well.
    valid = [
        read_log(tmp_path / run / "log.json")["Epoch 0"]["valid_log"]["loss"]
        for run in ("eager", "compiled")
    ]
    assert valid[1] == pytest.approx(valid[0], rel=0.1)
