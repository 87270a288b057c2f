"""The real CLI end to end on the shipped task, shrunk: outputs, log.json, learning, progress bars.

pytest tests/template/test_train.py
"""

import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import data_args, launch, read_json, weights
from core import options

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
def run(tiny_data, tmp_path_factory):
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


def test_outputs_and_their_names(run):
    outdir, _ = run
    assert {p.name for p in outdir.iterdir()} == {
        "best",
        "last",
        "log.json",
        ".lock",
    }  # .lock: one run at a time
    for checkpoint in ("best", "last"):
        assert {p.name for p in (outdir / checkpoint).iterdir()} == FILES


def test_my_config_holds_every_resolved_option(run, tiny_data):
    outdir, _ = run
    saved = read_json(outdir / "last" / "my_config.json")
    assert (
        saved["epochs"] == EPOCHS and saved["batch_size"] == 16 and saved["num_warmup_steps"] == 5
    )
    assert saved["train_file"] == str(tiny_data / "train.jsonl") and saved["outdir"] == str(outdir)
    assert (
        saved["lr_scheduler_type"] == "linear" and saved["seed"] == 42
    )  # defaults are recorded too


def test_log_json_structure_and_learning(run):
    outdir, _ = run
    log = read_json(outdir / "log.json")
    assert list(log) == [f"Epoch {i}" for i in range(EPOCHS)]
    for entry in log.values():
        assert set(entry) == {"train_log", "valid_log"}
        assert set(entry["train_log"]) == {"loss", "lr"} and set(entry["valid_log"]) == {
            "loss",
            "accuracy",
            "macro_f1",
        }
    assert log["Epoch 1"]["train_log"]["loss"] < log["Epoch 0"]["train_log"]["loss"]
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]
    assert log == read_json(outdir / "last" / "trainer_state.json")["log"]


def test_linear_schedule_ends_at_zero(run):
    outdir, _ = run
    log = read_json(outdir / "log.json")
    # 20 optimizer steps per epoch, 5 of warmup: after epoch 0 the lr is 1e-3 * (40 - 20) / 35.
    assert log["Epoch 0"]["train_log"]["lr"] == pytest.approx(1e-3 * 20 / 35, rel=1e-9)
    assert log[f"Epoch {EPOCHS - 1}"]["train_log"]["lr"] == 0.0


def test_best_is_the_epoch_with_the_lowest_valid_loss(run):
    outdir, _ = run
    log = read_json(outdir / "log.json")
    best_epoch = min(range(EPOCHS), key=lambda i: log[f"Epoch {i}"]["valid_log"]["loss"])
    state = read_json(outdir / "best" / "trainer_state.json")
    assert state["epoch"] == best_epoch + 1
    assert state["best_metric"] == log[f"Epoch {best_epoch}"]["valid_log"]["loss"]


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_checkpoint_loads_with_from_pretrained_alone(run, tiny_data, checkpoint):
    """What a user does after training: two from_pretrained calls, no train.py."""
    from dataset import generate_dataset
    from modeling import Model

    outdir, _ = run
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
        read_json(outdir / "log.json")[f"Epoch {epoch}"]["valid_log"]["accuracy"]
    )


def test_progress_bars_have_the_template_format(run):
    _, result = run
    lines = re.split(r"[\r\n]+", result.stderr)
    train = r"\[Epoch 1\] \[TRAIN\]: 100%\|██████████\| 20/20 \[\d\d:\d\d<00:00, +[\d.]+it/s, loss=[\d.]+, lr=0\]"
    valid = r"\[Epoch 0\] \[VALID\]: 100%\|██████████\| 4/4 \[\d\d:\d\d<00:00, +[\d.]+it/s, loss=[\d.]+, accuracy=[\d.]+, macro_f1=[\d.]+\]"
    assert any(re.fullmatch(train, line.strip()) for line in lines), (
        "no final TRAIN bar of the expected form"
    )
    assert any(re.fullmatch(valid, line.strip()) for line in lines), (
        "no final VALID bar of the expected form"
    )
    mid = r"\[Epoch 0\] \[TRAIN\]: +\d+%\|.{10}\| \d+/20 \[.*, loss=[\d.]+, lr=[\d.]+(e-\d+)?\]"
    assert any(re.fullmatch(mid, line.strip()) for line in lines)
