"""The optional hooks of the user files: what they get, and a task that has none.

metric_inputs() and predictions() get the unwrapped model (in eval mode, without gradients: it may
generate) and the tokenizer, on every process, gathered: the fork here replaces the pinned pair's
by ones that use both. A task without a tokenizer or metrics trains, saves and resumes.

    python -m pytest -q tests/template/test_hooks.py
"""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

import dataset
import train
from conftest import TREE, data_args, fork, launch, read_log

# -------------------------------------------------------- the hooks get the model and the tokenizer


HOOKS = """

def metric_inputs(model, tokenizer, batch, outputs):  # the forker's: it runs the model itself
    import os
    assert type(model) is Model and not model.training and not torch.is_grad_enabled()
    with open(os.environ["HOOK_LOG"], "a") as f:
        rank, name = os.environ.get("RANK", "0"), type(tokenizer).__name__
        f.write(f"{rank} {len(batch['labels'])} {name}\\n")
    return {"predictions": model(**batch).logits.argmax(-1), "labels": batch["labels"]}


def predictions(model, tokenizer, batch, outputs):
    return [
        {"text": tokenizer.decode(ids, skip_special_tokens=True), "label": model.config.id2label[i]}
        for ids, i in zip(batch["input_ids"].tolist(), outputs.logits.argmax(-1).tolist())
    ]
"""


def test_metric_inputs_and_predictions_get_the_model_and_the_tokenizer_on_every_process(
    tiny_data, tmp_path
):
    tree = fork(tmp_path, {"modeling.py": {"": HOOKS}})
    log = tmp_path / "hooks.log"
    outdir = tmp_path / "model"
    launch(
        *data_args(tiny_data),
        "--model_name_or_path",
        TREE / "assets" / "tiny-bert",
        "--epochs",
        1,
        "--batch_size",
        8,
        "--outdir",
        outdir,
        processes=2,
        cwd=tree,
        env={"HOOK_LOG": str(log)},
    )
    calls = [line.split() for line in log.read_text().splitlines()]
    assert {name for _, _, name in calls} == {
        "TokenizersBackend"
    }  # transformers 5: the fast tokenizer
    # Each process: train.py's check of one batch of 3 before step 1 (2 validation examples and the
    # longest training one), then its 4 batches of 8 of the 64 validation rows.
    assert (
        sorted((rank, int(size)) for rank, size, _ in calls)
        == [("0", 3)] + [("0", 8)] * 4 + [("1", 3)] + [("1", 8)] * 4
    )
    valid_log = read_log(outdir / "log.json")["Epoch 0"]["valid_log"]
    assert set(valid_log) == {"loss", "accuracy", "macro_f1"} and 0 <= valid_log["accuracy"] <= 1

    output = tmp_path / "predictions.jsonl"
    launch(
        "--checkpoint",
        outdir / "best",
        "--input_file",
        tiny_data / "valid.jsonl",
        "--output_file",
        output,
        cwd=tree,
        script="predict.py",
        env={"HOOK_LOG": str(log)},
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    texts = [
        json.loads(line)["text"] for line in (tiny_data / "valid.jsonl").read_text().splitlines()
    ]
    assert [row["text"] for row in rows] == texts  # decoded with the checkpoint's tokenizer
    assert {row["label"] for row in rows} <= {"negative", "neutral", "positive"}


# ------------------------------------------------------ a task without a tokenizer, without metrics


class TableConfig(PretrainedConfig):
    model_type = "test-table-regressor"

    def __init__(self, features=3, **kwargs):
        self.features = features
        super().__init__(**kwargs)


@dataclass
class RegressionOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction: torch.Tensor | None = None


class TableModel(PreTrainedModel):
    config_class = TableConfig

    def __init__(self, config):
        super().__init__(config)
        self.layer = nn.Linear(config.features, 1)
        self.post_init()

    def forward(self, x, y=None):
        prediction = self.layer(x).squeeze(-1)
        return RegressionOutput(
            loss=nn.functional.mse_loss(prediction, y) if y is not None else None,
            prediction=prediction,
        )


class TableDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
        self.labels = None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def collate(self, samples):
        return {
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.stack([s["y"] for s in samples]),
        }


@pytest.fixture
def table_task(monkeypatch):
    """A tabular regression pair as a user would write it: no tokenizer anywhere."""
    monkeypatch.delattr(dataset, "load_tokenizer")
    monkeypatch.setattr(
        train,
        "generate_dataset",
        lambda path, split, tokenizer, args, labels=None: TableDataset(
            256 if split == "train" else 64, seed=0 if split == "train" else 1
        ),
    )
    monkeypatch.setattr(train, "build_model", lambda name, train_set: TableModel(TableConfig()))
    monkeypatch.delattr(
        train.modeling, "metric_inputs"
    )  # optional: validation reports the loss only
    monkeypatch.delattr(train.modeling, "compute_metrics")


def test_a_task_without_a_tokenizer_trains_saves_and_resumes(table_task, tmp_path):
    outdir = tmp_path / "model"
    # The model folder is not even read by this task: a tokenizer is no longer loaded from it.
    args = [
        "--model_name_or_path",
        tmp_path / "nothing-here",
        "--batch_size",
        32,
        "--epochs",
        2,
        "--lr",
        0.05,
        "--outdir",
        outdir,
    ]
    train.main([*map(str, args), "--stop_after_steps", "12"])
    train.main(["--resume", str(outdir / "last")])
    files = {p.name for p in (outdir / "last").iterdir()}
    assert not any(name.startswith(("tokenizer", "vocab", "special_tokens")) for name in files)
    log = read_log(outdir / "log.json")
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]
    assert TableModel.from_pretrained(outdir / "best").layer.weight.shape == (1, 3)


# ----------------------------------------- values that are not tensors, rows giving two examples

RIDING = '''

_generate_dataset = generate_dataset


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    """The pinned pair's data, each batch with a list of strings for the hooks ("note"); in predict
    mode every input row gives two examples, each carrying its row's number ("row")."""
    data = _generate_dataset(path, split, tokenizer, args, labels, predicting)
    if predicting:
        twice = lambda b, i: {**{k: [v for v in b[k] for _ in "ab"] for k in b},  # noqa: E731
                              "row": [j for j in i for _ in "ab"]}  # fmt: skip
        data.rows = data.rows.map(twice, batched=True, with_indices=True)
    pad = data.collate

    def collate(samples):
        rows = [sample.pop("row", None) for sample in samples]
        batch = pad(samples)
        batch["note"] = [f"{len(sample['input_ids'])} tokens" for sample in samples]
        if rows[0] is not None:
            batch["row"] = rows
        return batch

    data.collate = collate
    return data
'''

MERGE = """

def merge_predictions(predictions):  # the two examples of a row: the same text, so one prediction
    assert len(predictions) == 2 and predictions[0] == predictions[1], predictions
    return {**predictions[0], "examples": len(predictions)}


_format_samples = format_samples


def format_samples(model, tokenizer, batch, outputs, k):
    assert batch["note"][0].endswith(" tokens")  # the hooks get what rides along
    return _format_samples(model, tokenizer, batch, outputs, k)
"""


def test_values_that_are_not_tensors_reach_the_hooks_not_forward_and_rows_group_predictions(
    tiny_data, tmp_path
):
    """A batch with a list of strings ("note"): the pinned forward(labels=None, **inputs) passes
    its **inputs to the encoder, which would fail on it; train.py and --check keep it out of
    forward() and hand it to the hooks. In predict mode each row gives two examples with its "row":
    predict.py writes one line per input row, merged by merge_predictions()."""
    tree = fork(tmp_path, {"dataset.py": {"": RIDING}, "modeling.py": {"": MERGE}})
    outdir, model = tmp_path / "model", TREE / "assets" / "tiny-bert"
    common = [*data_args(tiny_data), "--model_name_or_path", model, "--batch_size", 32]
    result = launch(*common, "--epochs", 1, "--sample_every", 5, "--outdir", outdir, cwd=tree)
    assert "--- samples at step 5" in result.stdout + result.stderr
    checked = launch(*common, "--check", cwd=tree)
    keys = [line for line in checked.stdout.splitlines() if line.split()[:2] == ["PASS", "keys"]]
    assert keys and keys[0].endswith("; not tensors, for the hooks only: note"), checked.stdout
    assert "PASS  predict    32 examples of 16 rows -> 16 lines, the first: {" in checked.stdout
    output = tmp_path / "predictions.jsonl"
    valid = tiny_data / "valid.jsonl"
    launch("--checkpoint", outdir / "best", "--input_file", valid, "--output_file", output,
           cwd=tree, script="predict.py")  # fmt: skip
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(valid.read_text().splitlines())))
    assert all(line["examples"] == 2 and "label" in line for line in lines)
