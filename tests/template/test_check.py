"""`train.py --check`: the default pair passes; each planted wiring bug fails the check meant to catch it.

pytest tests/template/test_check.py               # in this process
pytest -m slow tests/template/test_check.py       # 2 processes, and both example pairs, under accelerate launch
"""

import random
import time

import pytest
import torch
from test_examples import EXAMPLES, copy_repository, fork_with_example
from torch import nn

import modeling
import train
from conftest import data_args, launch, run, weights


def check(tiny_data, tmp_path, *extra):
    """train.py --check on the tiny data: (exit status, {check name: [(verdict, text)]})."""
    result = run(
        *data_args(tiny_data), "--outdir", tmp_path / "model", "--check", *extra, check=False
    )
    lines = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition("  ")
        if verdict in ("PASS", "WARN", "FAIL"):
            name, _, text = rest.strip().partition(" ")
            lines.setdefault(name, []).append((verdict, text.strip()))
    assert not (tmp_path / "model").exists()  # --check writes nothing into --outdir
    return result.returncode, lines


def verdicts(lines):
    return {name: {v for v, _ in entries} for name, entries in lines.items()}


def test_the_default_pair_passes_every_check(tiny_data, tmp_path):
    status, lines = check(tiny_data, tmp_path)
    assert status == 0, lines
    expected = {
        "data",
        "labels",
        "keys",
        "forward",
        "gradients",
        "padding",
        "overfit",
        "learning",
        "round-trip",
        "split",
        "metrics",
        "speed",
    }
    assert set(lines) == expected and all(v == {"PASS"} for v in verdicts(lines).values()), lines
    assert "negative: " in lines["labels"][0][1] and "ln 3 = 1.0986" in lines["forward"][0][1]
    assert lines["metrics"][0][1].startswith("on 64 validation examples: accuracy ")


def test_a_metric_that_is_not_per_example_fails_the_metrics_check(monkeypatch, tiny_data, tmp_path):
    monkeypatch.setattr(
        modeling,
        "metric_inputs",
        lambda model, tokenizer, batch, outputs: {
            "correct": (outputs.logits.argmax(-1) == batch["labels"]).sum()
        },
    )  # summed: one number
    status, lines = check(tiny_data, tmp_path)
    assert status == 1 and lines["metrics"][0][0] == "FAIL", lines
    assert (
        "gave 'correct' of shape () for a batch of 32: it must give a tensor per example"
        in lines["metrics"][0][1]
    )


def test_check_changes_nothing_a_later_run_does(tiny_data, tmp_path):
    run(*data_args(tiny_data), "--batch_size", 32, "--epochs", 1, "--outdir", tmp_path / "plain")
    check(tiny_data, tmp_path)
    run(*data_args(tiny_data), "--batch_size", 32, "--epochs", 1, "--outdir", tmp_path / "after")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            weights(tmp_path / "plain" / "last").values(),
            weights(tmp_path / "after" / "last").values(),
        )
    )


def planted(monkeypatch, build=None, forward=None, dataset=None):
    """Plants a bug in the default pair, as a user's edit of modeling.py / dataset.py would."""
    if build:
        original = train.build_model
        monkeypatch.setattr(
            train, "build_model", lambda name, train_set: build(original(name, train_set))
        )
    if forward:
        monkeypatch.setattr(modeling.Model, "forward", forward)
    if dataset:
        original_dataset = train.generate_dataset
        monkeypatch.setattr(
            train,
            "generate_dataset",
            lambda path, split, *a, **k: dataset(original_dataset(path, split, *a, **k), split),
        )


def add_unused_layer(model):
    model.unused = nn.Linear(4, 4)  # never called in forward()
    return model


def forward_without_mask(self, labels=None, attention_mask=None, **inputs):
    return original_forward(self, labels=labels, **inputs)  # the encoder attends to padding


def detached_loss(self, labels=None, **inputs):
    outputs = original_forward(self, labels=labels, **inputs)
    outputs.loss = outputs.loss.detach()
    return outputs


def shuffle_training_labels(data, split):
    if split == "train":
        read = data.rows.__getitems__
        shuffled = [row["labels"] for row in read(range(len(data.rows)))]
        random.Random(0).shuffle(shuffled)
        data.rows.__getitems__ = lambda indices: [
            {**row, "labels": shuffled[i]} for i, row in zip(indices, read(indices))
        ]
    return data


def drop_labels_in_collate(data, split):
    collate = data.collate
    data.collate = lambda samples: {k: v for k, v in collate(samples).items() if k != "labels"}
    return data


def temperature_not_in_config(model):
    model.temperature = 3.0  # an attribute, not a config field: from_pretrained builds it without

    def forward(labels=None, **inputs):
        outputs = original_forward(model, labels=labels, **inputs)
        outputs.logits = outputs.logits / getattr(model, "temperature", 1.0)
        return outputs

    model.forward = forward
    return model


def slow_loading(data, split):
    getitems = data.__getitems__

    class Slow(type(data)):
        def __getitems__(self, indices):
            time.sleep(0.1)  # far above a training step of the tiny model, even on a busy machine
            return getitems(indices)

    data.__class__ = Slow
    return data


original_forward = modeling.Model.forward


@pytest.mark.parametrize(
    "plant, name, fragment",
    [
        (dict(build=add_unused_layer), "gradients", "get no gradient (unused"),
        (
            dict(forward=forward_without_mask),
            "padding",
            "is the attention_mask passed to the encoder?",
        ),
        (dict(forward=detached_loss), "forward", "does not require grad"),
        (dict(dataset=shuffle_training_labels), "learning", "do the labels belong to their inputs"),
        (dict(dataset=drop_labels_in_collate), "forward", "the loss is None"),
        (dict(build=temperature_not_in_config), "round-trip", "not in its config"),
    ],
)
def test_a_planted_bug_fails_its_check(plant, name, fragment, monkeypatch, tiny_data, tmp_path):
    planted(monkeypatch, **plant)
    status, lines = check(tiny_data, tmp_path)
    assert status == 1
    failed = [text for verdict, text in lines.get(name, []) if verdict == "FAIL"]
    assert failed and fragment in failed[0], lines
    assert "unused.weight" in failed[0] if name == "gradients" else True


def test_an_lr_of_zero_fails_the_overfit_check(tiny_data, tmp_path):
    status, lines = check(tiny_data, tmp_path, "--lr", 0)
    assert (
        status == 1 and lines["overfit"][0][0] == "FAIL" and "an lr of 0" in lines["overfit"][0][1]
    )


def test_a_slow_loader_is_a_warning_not_a_failure(monkeypatch, tiny_data, tmp_path):
    planted(monkeypatch, dataset=slow_loading)
    status, lines = check(tiny_data, tmp_path)
    assert (
        status == 0
        and lines["speed"][0][0] == "WARN"
        and "the data loader is the bottleneck" in lines["speed"][0][1]
    )


@pytest.mark.slow
def test_two_processes_see_different_batches_and_keep_equal_weights(tiny_data, tmp_path):
    result = launch(*data_args(tiny_data), "--outdir", tmp_path / "model", "--check", processes=2)
    assert "PASS  processes  2 processes see different batches" in result.stdout
    assert "PASS  processes  weights after one step are identical on every process" in result.stdout
    assert "--check: every check passed" in result.stdout and not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_both_example_pairs_pass_check_unchanged(name, tmp_path):
    repo, options = fork_with_example(name, tmp_path)
    result = launch(*options, "--check", cwd=repo)
    assert "--check: every check passed" in result.stdout, result.stdout
    assert "FAIL" not in result.stdout
    assert (
        "PASS  split      one step at --batch_size 16 and at 8 x --accumulation 2 give the same gradient"
        in result.stdout
    )


LABELS = (
    '        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)\n'
)
SHIFTED = {  # the causal LM example's labels, shifted by hand before the model shifts them again
    "twice": LABELS + '        batch["labels"] = torch.cat([batch["labels"][:, 1:], '
    'torch.full_like(batch["labels"][:, :1], -100)], 1)\n',
    "back": LABELS
    + '        batch["labels"] = torch.cat([torch.full_like(batch["labels"][:, :1], -100), '
    'batch["labels"][:, :-1]], 1)\n',  # the model then learns to copy its input
}


@pytest.mark.parametrize(
    "shift, fragment",
    [
        ("twice", "predicts the token two ahead"),
        pytest.param("back", "predicts its own input token", marks=pytest.mark.slow),
    ],
)
def test_labels_shifted_by_hand_in_a_causal_lm_fail_the_shift_check(shift, fragment, tmp_path):
    repo, options = fork_with_example("causal_lm", tmp_path)
    source = (repo / "dataset.py").read_text()
    assert source.count(LABELS) == 1
    (repo / "dataset.py").write_text(source.replace(LABELS, SHIFTED[shift]))
    result = launch(*options, "--check", cwd=repo, check=False)
    assert result.returncode == 1, result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  shift") and fragment in failed[0], (
        result.stdout
    )


ENCODER_MASK = "        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,\n"


@pytest.mark.slow
def test_an_encoder_decoder_that_drops_the_encoders_mask_fails_the_padding_check(tmp_path):
    """examples/seq2seq passes --check (test_example_seq2seq.py); with the attention mask kept from
    its encoder, the decoder's logits change by far more than the tolerance when a source is padded."""
    repo = tmp_path / "repo"
    copy_repository(repo)
    source = (repo / "examples" / "seq2seq" / "modeling.py").read_text()
    assert source.count(ENCODER_MASK) == 1
    (repo / "modeling.py").write_text(
        source.replace(
            ENCODER_MASK,
            ENCODER_MASK.replace("attention_mask=attention_mask", "attention_mask=None"),
        )
    )
    (repo / "dataset.py").write_text((repo / "examples" / "seq2seq" / "dataset.py").read_text())
    result = launch("--config", "examples/seq2seq/train.yaml", "--check", cwd=repo, check=False)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 1 and len(failed) == 1, result.stdout
    assert (
        failed[0].startswith("FAIL  padding")
        and "is the attention_mask passed to the encoder?" in failed[0]
    )
