"""The checks before step 1: what every run refuses before training, and `train.py --check`.

Every run refuses a plain nn.Module, a forward() without a scalar loss, a hook with the old
parameters, a tokenizer without a pad token, --max_len beyond the model's positions and an unknown
--metric_for_best. `--check`: the default pair passes; each planted wiring bug fails the check
meant to catch it.

    python -m pytest -q tests/template/test_check.py
    python -m pytest -q -m slow tests/template/test_check.py    # 2 processes, the example pairs
"""

import json
import random
import time
from types import SimpleNamespace

import pytest
import torch
from test_examples import EXAMPLES, copy_repository, fork_with_example
from test_hooks import RegressionOutput, TableConfig, TableModel
from torch import nn
from transformers.utils import ModelOutput

import dataset
import modeling
import train
from conftest import FAST, data_args, launch, refused, run, weights
from core import check as core_check

# ------------------------------------------------------ refused before the first step, by every run


def test_a_plain_nn_module_is_refused_before_the_first_step(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda name, train_set: nn.Linear(2, 2))
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "build_model() in modeling.py returned a Linear, not a transformers PreTrainedModel",
        "Subclass PreTrainedModel",
    )
    assert not (tmp_path / "model").exists()


def test_a_loss_that_is_not_a_scalar_is_one_line(tiny_data, tmp_path, monkeypatch):
    build = train.build_model

    def per_example_loss(name, train_set):
        model = build(name, train_set)
        forward = model.forward
        model.forward = lambda **batch: RegressionOutput(
            loss=nn.functional.cross_entropy(
                forward(**batch).logits, batch["labels"], reduction="none"
            )
        )
        return model

    monkeypatch.setattr(train, "build_model", per_example_loss)
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "Model.forward() returned a loss of shape (3,): it must be a scalar tensor",
    )


def test_no_loss_says_which_keys_went_into_kwargs(tiny_data, tmp_path, monkeypatch):
    class Swallowing(nn.Module):
        def forward(self, target=None, **inputs):  # the batch has `labels`, so target stays None
            return ModelOutput(logits=torch.zeros(2, 3))

    class Model(TableModel):
        forward = Swallowing.forward

    monkeypatch.setattr(train, "build_model", lambda name, train_set: Model(TableConfig()))
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "returned no loss",
        "input_ids, labels, attention_mask are not parameters of forward() and went into its "
        "**inputs",
    )


@pytest.mark.parametrize("script", ["train", "predict"])
def test_a_hook_with_the_old_parameters_is_one_line(script, monkeypatch, tiny_data, tmp_path):
    import predict

    monkeypatch.setattr(
        train.modeling, "predictions", lambda config, batch, outputs: []
    )  # before the change
    argv = (
        [*data_args(tiny_data), "--outdir", tmp_path / "model"]
        if script == "train"
        else ["--checkpoint", tmp_path / "none", "--input_file", tiny_data / "valid.jsonl"]
    )
    with pytest.raises(SystemExit) as exit_info:
        (train if script == "train" else predict).main([str(a) for a in argv])
    assert str(exit_info.value.code) == (
        "error: modeling.py: predictions(config, batch, outputs) cannot take (model, tokenizer, "
        "batch, outputs), what it is called with: give it those parameters (the list at the top "
        "of modeling.py says what each is)."
    )
    assert not (tmp_path / "model").exists()


def test_a_hook_with_defaulted_model_and_tokenizer_at_the_end_is_one_line(
    monkeypatch, tiny_data, tmp_path
):
    """The old parameters with `model` and `tokenizer` added at the end, defaulted: they bind,
    but each would get another's value (batch the model, ...). Refused by their names."""

    def metric_inputs(batch, outputs, model=None, tokenizer=None):
        return {}

    monkeypatch.setattr(train.modeling, "metric_inputs", metric_inputs)
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "modeling.py: metric_inputs(batch, outputs, model=None, tokenizer=None) cannot take "
        "(model, tokenizer, batch, outputs)",
    )
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("hook", ["loss_items", "metric_inputs"])
def test_a_per_example_hook_that_sums_the_batch_is_refused_before_step_1(
    hook, monkeypatch, tiny_data, tmp_path, capsys
):
    """A 0-dim tensor for the batch passes one batch, then fails when the epoch's are concatenated
    (train.py's validation, after a whole epoch of training): refused before step 1."""
    if hook == "loss_items":

        def counted(batch):  # summed: one number for the batch
            return batch["labels"].ne(-100).sum()

        monkeypatch.setattr(train.modeling, "loss_items", counted, raising=False)
        expected = "modeling.py: loss_items(batch) is () for a batch of 3 examples"
    else:
        metric_inputs = train.modeling.metric_inputs

        def summed(model, tokenizer, batch, outputs):
            return {k: v.sum() for k, v in metric_inputs(model, tokenizer, batch, outputs).items()}

        monkeypatch.setattr(train.modeling, "metric_inputs", summed)
        expected = "modeling.py: metric_inputs(model, tokenizer, batch, outputs)['"
    message = refused([*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"], expected)
    assert "give one value per example" in message and "is () for a batch of 3" in message
    assert not (tmp_path / "model").exists()
    # --check FAILs the same hook (it once PASSed "split" with a summed loss_items).
    with pytest.raises(SystemExit) as checked:
        train.main([str(a) for a in (*data_args(tiny_data), *FAST, "--check")])
    assert checked.value.code == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    check = "split" if hook == "loss_items" else "metrics"
    assert len(failed) == 1 and failed[0].split()[1] == check, failed


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_forward_that_returns_no_model_output_is_one_line_and_one_check(
    kind, tiny_data, tmp_path, monkeypatch, capsys
):
    build = train.build_model

    def plain(name, train_set):
        model = build(name, train_set)
        forward = model.forward

        def returns_plain(**batch):
            outputs = forward(**batch)
            if kind == "tuple":
                return outputs.loss, outputs.logits
            return {"loss": outputs.loss, "logits": outputs.logits}

        model.forward = returns_plain
        return model

    monkeypatch.setattr(train, "build_model", plain)
    args = [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"]
    refused(args, f"Model.forward() returned a {kind}: return a ModelOutput")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main([str(a) for a in [*args, "--check"]])
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed == [
        f"FAIL  forward    Model.forward() returned a {kind}: return a ModelOutput (e.g. "
        "transformers' SequenceClassifierOutput(loss=..., logits=...), or a dataclass of your own "
        "deriving from ModelOutput, as modeling.py does), not a tuple or a plain dict: train.py "
        "reads outputs.loss and the hooks outputs.logits."
    ]


def test_a_tokenizer_without_a_pad_token_is_one_line_before_training(
    monkeypatch, tiny_data, tmp_path
):
    load_tokenizer = dataset.load_tokenizer

    def without_pad_token(source, args):
        tokenizer = load_tokenizer(source, args)
        tokenizer.pad_token = None  # as in a tokenizer.json made without one
        return tokenizer

    monkeypatch.setattr(train.dataset, "load_tokenizer", without_pad_token)
    for extra in ([], ["--check"]):
        message = refused(
            [*data_args(tiny_data), "--outdir", tmp_path / "model", *extra],
            "the tokenizer of assets/tiny-bert has no pad token, which Dataset.collate() needs",
            "tokenizer.pad_token = tokenizer.eos_token",
        )
        assert "\n" not in message and not (tmp_path / "model").exists()


def test_an_unknown_metric_for_best_is_refused_before_the_first_step(
    tiny_data, tmp_path, monkeypatch
):
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))
    refused(
        [*data_args(tiny_data), *FAST, "--metric_for_best", "f1", "--outdir", tmp_path / "model"],
        "--metric_for_best f1: not among the validation metrics (loss, accuracy, macro_f1)",
    )
    assert not (tmp_path / "model").exists() and not steps  # nothing trained, nothing written


# ---------------------------------------------------------- --max_len against the model's positions


@pytest.mark.parametrize("extra", [[], ["--check"]])
def test_max_len_beyond_the_models_positions_is_one_line_before_training(
    extra, tiny_data, tmp_path
):
    """The pinned pair wraps a BERT of 128 positions inside its own model: found there."""
    message = refused(
        [*data_args(tiny_data), "--max_len", 129, "--outdir", tmp_path / "model", *extra]
    )
    assert message == (
        "error: --max_len 129: the model of assets/tiny-bert has 128 positions, so a longer input "
        "would fail mid-run. Pass --max_len 128 or less."
    )
    assert not (tmp_path / "model").exists()


def test_max_len_beyond_the_models_positions_is_refused_before_training(tmp_path):
    long_text = " ".join(["the food was great"] * 60)  # ~240 tokens; tiny-bert has 128 positions
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(
        json.dumps({"text": long_text, "label": "positive"})
        + "\n"
        + json.dumps({"text": "awful", "label": "negative"})
        + "\n"
    )
    refused(
        [
            "--train_file",
            train_file,
            "--valid_file",
            train_file,
            "--max_len",
            512,
            "--outdir",
            tmp_path / "model",
        ],
        "--max_len 512: the model of assets/tiny-bert has 128 positions",
        "Pass --max_len 128 or less",
    )
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "config, limit",
    [
        ({"model_type": "gpt2", "n_positions": 128}, 128),
        (
            {"model_type": "roberta", "max_position_embeddings": 514},
            512,
        ),  # 2 rows before the first position
        (
            {"model_type": "bart", "max_position_embeddings": 64},
            64,
        ),  # its table holds 66: an offset of 2
        ({"model_type": "t5", "n_positions": 512}, None),  # relative positions: any length runs
    ],
)
def test_the_positions_are_read_from_the_models_position_table(config, limit):
    from transformers import AutoConfig, AutoModel

    sizes = {
        "gpt2": dict(n_embd=16, n_layer=1, n_head=2),
        "roberta": dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        ),
        "t5": dict(d_model=16, num_layers=1, num_heads=2, d_ff=16, d_kv=8),
        "bart": dict(
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
        ),
    }[config["model_type"]]
    model = AutoModel.from_config(AutoConfig.for_model(**config, **sizes))
    assert core_check.positions(model) == limit
    core_check.check_positions(
        model, SimpleNamespace(max_len=limit or 4096, model_name_or_path="m")
    )
    if limit:
        with pytest.raises(
            SystemExit, match=f"--max_len {limit + 1}: the model of m has {limit} positions"
        ):
            core_check.check_positions(
                model, SimpleNamespace(max_len=limit + 1, model_name_or_path="m")
            )


# ---------------------------------------------------------------- --check


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
        "predict",
        "speed",
    }
    assert set(lines) == expected and all(v == {"PASS"} for v in verdicts(lines).values()), lines
    assert "negative: " in lines["labels"][0][1] and "ln 3 = 1.0986" in lines["forward"][0][1]
    assert lines["metrics"][0][1].startswith("on 64 validation examples: accuracy ")
    assert lines["predict"][0][1].startswith('32 examples -> 32 lines, the first: {"label": ')


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


# ---------------------------------------------------------------- --check on the example pairs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_both_example_pairs_pass_check_unchanged(name, tmp_path):
    repo, options = fork_with_example(name, tmp_path)
    result = launch(*options, "--check", cwd=repo)
    assert "--check: every check passed" in result.stdout, result.stdout
    assert "FAIL" not in result.stdout
    assert (
        "PASS  split      one step at --batch_size 16 and at 8 x --accumulation 2 give the same "
        "gradient" in result.stdout
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


PAD_PER_BATCH = "DataCollatorForTokenClassification(tokenizer)"


@pytest.mark.slow
def test_per_token_outputs_padded_to_a_fixed_length_pass_the_padding_check(tmp_path):
    """A collate that pads every batch to one length (run_qa.py's pad_to_max_length) pads the
    example alone too: each output is compared on its own positions (was a FAIL by inf)."""
    repo, options = fork_with_example("token_classification", tmp_path)
    source = (repo / "dataset.py").read_text()
    assert source.count(PAD_PER_BATCH) == 1
    fixed = PAD_PER_BATCH.replace(")", ', padding="max_length", max_length=48)')
    (repo / "dataset.py").write_text(source.replace(PAD_PER_BATCH, fixed))
    result = launch(*options, "--check", cwd=repo, check=False)
    assert "input_ids (16, 48)" in result.stdout, result.stdout  # every batch that long
    assert "PASS  padding    outputs alone and padded agree" in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout


ENCODER_MASK = "            attention_mask=attention_mask,\n"  # in forward()'s super().forward()


@pytest.mark.slow
def test_an_encoder_decoder_that_drops_the_encoders_mask_fails_the_padding_check(tmp_path):
    """examples/seq2seq passes --check (test_example_seq2seq.py); with the attention mask kept from
    its encoder, the decoder's logits change by far more than the tolerance when a source is
    padded."""
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


def test_a_label_beyond_the_outputs_is_one_line_that_points_both_ways(
    monkeypatch, tiny_data, tmp_path
):
    """An answer's end position past the sequence (a hand-written loss over positions) once said
    "Target 306 is out of bounds ... If the model has fewer positions, lower --max_len": the wrong
    way. Now: what is out of range, and a longer --max_len or dropping/clipping in dataset.py."""
    real = torch.nn.functional.cross_entropy

    def shifted(logits, labels, *args, **kwargs):  # every label 306 further: out of the outputs
        return real(logits, labels + 306, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", shifted)
    message = refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "error: a label is beyond what the model's outputs cover (Target 30",
        "give a longer --max_len",
        "or drop or clip such examples in dataset.py",
    )
    assert "lower --max_len" not in message
    assert not (tmp_path / "model").exists()


def test_checks_cut_short_by_their_time_budget_warn_and_say_so(monkeypatch, tiny_data, capsys):
    """On a large model the overfit and learning checks stop at their budget (CHECK_SECONDS) and
    are judged on the steps taken: a bar not reached yet is a WARN naming the budget, not a FAIL.
    A budget of 0 s stands for a model slow enough to reach it: one step each."""
    from core import check

    monkeypatch.setattr(check, "CHECK_SECONDS", 0)
    train.main([str(a) for a in (*data_args(tiny_data), *FAST, "--check")])  # WARNs do not fail
    out, err = capsys.readouterr()
    assert "--check: every check passed" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line[:4] in ("PASS", "WARN")}
    assert lines["overfit"].startswith("WARN  overfit    1 steps on one batch in the 0 s budget")
    assert lines["learning"].startswith("WARN  learning   1 steps on training batches in the 0 s")
    assert "      overfit    running ..." in err
