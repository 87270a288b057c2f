"""predict.py on a checkpoint of a real (tiny, 1-epoch) run: one line per input row, in order, the
same accuracy as training's validation, embeddings that do not depend on the batch, clear errors.

    pytest tests/task/test_predict.py
"""

import json
import subprocess
import sys

import pytest
import torch

import predict
from conftest import ROOT, data_args, read_json, read_log, run
from modeling import Model


def run_predict(*args):
    predict.main([str(a) for a in args])


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def outdir(tiny_data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("predict") / "model"
    # Batch 4: 80 steps, enough for the model to learn something (accuracy well above a constant
    # guess).
    run(*data_args(tiny_data), "--outdir", outdir, "--epochs", 1, "--batch_size", 4)
    return outdir


@pytest.fixture(scope="module")
def gold(tiny_data):
    return [json.loads(line) for line in (tiny_data / "valid.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def predicted(outdir, tiny_data):
    """predict.py on the validation file (labels included), one batch of 64, with embeddings."""
    output = outdir.parent / "predictions.jsonl"
    run_predict(
        "--checkpoint",
        outdir / "best",
        "--input_file",
        tiny_data / "valid.jsonl",
        "--output_file",
        output,
        "--embeddings",
    )
    return read_lines(output)


@pytest.fixture(scope="module")
def predicted_unlabelled(outdir, gold):
    """The same texts without a label column, one example per batch (no padding at all)."""
    unlabelled = outdir.parent / "texts.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in gold))
    output = outdir.parent / "unlabelled.jsonl"
    run_predict(
        "--checkpoint",
        outdir / "best",
        "--input_file",
        unlabelled,
        "--output_file",
        output,
        "--embeddings",
        "--batch_size",
        1,
    )
    return read_lines(output)


def test_one_line_per_row_in_input_order(predicted, gold):
    assert len(predicted) == len(gold)
    assert [row["index"] for row in predicted] == list(range(len(gold)))


def test_labels_and_scores_are_the_models(predicted, gold, outdir):
    """Each row's label and score are the top class and its softmax probability, recomputed here."""
    import dataset

    model = Model.from_pretrained(outdir / "best").eval()
    tokenizer = dataset.load_tokenizer(outdir / "best", None)
    texts = [row["text"] for row in gold[:8]]
    with torch.no_grad():
        probabilities = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(
            -1
        )
    scores, ids = probabilities.max(-1)
    assert [row["label"] for row in predicted[:8]] == [
        model.config.id2label[i] for i in ids.tolist()
    ]
    assert [row["score"] for row in predicted[:8]] == pytest.approx(scores.tolist(), abs=1e-5)


def test_accuracy_matches_training_validation(predicted, gold, outdir):
    # One epoch: best/ is that epoch's model, and log.json holds its validation accuracy on the same
    # file.
    accuracy = sum(p["label"] == g["label"] for p, g in zip(predicted, gold)) / len(gold)
    expected = read_log(outdir / "log.json")["Epoch 0"]["valid_log"]["accuracy"]
    assert accuracy == pytest.approx(expected, abs=1e-6)
    assert accuracy > 0.5  # it learned something, so a shuffled order or a label mix-up would show


def test_embeddings_have_hidden_size_and_do_not_depend_on_the_batch(
    predicted, predicted_unlabelled, outdir
):
    hidden_size = read_json(outdir / "best" / "config.json")["encoder"]["hidden_size"]
    assert all(len(row["embedding"]) == hidden_size for row in predicted)
    # Batch 64 (padded to the longest text) and batch 1 (no padding): the same vectors and labels.
    batched = torch.tensor([row["embedding"] for row in predicted])
    alone = torch.tensor([row["embedding"] for row in predicted_unlabelled])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert [row["label"] for row in predicted] == [row["label"] for row in predicted_unlabelled]


def test_input_without_label_column(predicted_unlabelled, gold):
    assert len(predicted_unlabelled) == len(gold)
    assert "embedding" in predicted_unlabelled[0] and "label" in predicted_unlabelled[0]


def test_missing_checkpoint_is_one_line(tmp_path, tiny_data):
    result = subprocess.run(
        [
            sys.executable,
            "predict.py",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--input_file",
            str(tiny_data / "valid.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --checkpoint {tmp_path / 'nope'}: no such directory. Give a checkpoint that "
        "train.py wrote, e.g. model/best."
    ]


def test_missing_input_file(outdir, tmp_path):
    with pytest.raises(SystemExit, match="--input_file .*missing.jsonl: no such file"):
        predict.main(
            [
                "--checkpoint",
                str(outdir / "best"),
                "--input_file",
                str(tmp_path / "missing.jsonl"),
                "--output_file",
                str(tmp_path / "out.jsonl"),
            ]
        )
    assert not (tmp_path / "out.jsonl").exists()


def test_failure_midway_leaves_previous_output_whole(outdir, tiny_data, tmp_path, monkeypatch):
    output = tmp_path / "predictions.jsonl"
    output.write_text("previous\n")
    calls = []

    def fails_on_second_batch(model, tokenizer, batch, outputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(model, tokenizer, batch, outputs)

    original = predict.modeling.predictions
    monkeypatch.setattr(predict.modeling, "predictions", fails_on_second_batch)
    with pytest.raises(RuntimeError, match="boom"):
        predict.main(
            [
                "--checkpoint",
                str(outdir / "best"),
                "--input_file",
                str(tiny_data / "valid.jsonl"),
                "--output_file",
                str(output),
                "--batch_size",
                "8",
                "--overwrite",
            ]
        )
    assert output.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == [
        "predictions.jsonl"
    ]  # no temporary file left behind


def test_bad_options_are_one_line(outdir, tiny_data, tmp_path):
    base = ["--checkpoint", str(outdir / "best"), "--input_file", str(tiny_data / "valid.jsonl")]
    with pytest.raises(SystemExit, match=r"--batch_size: 0 is not a whole number >= 1"):
        predict.main([*base, "--batch_size", "0", "--output_file", str(tmp_path / "out.jsonl")])
    with pytest.raises(SystemExit, match=r"--output_file .* is a directory; give a file name"):
        predict.main([*base, "--output_file", str(tmp_path)])


def test_a_checkpoint_of_another_task_is_refused(tmp_path, tiny_data):
    """A checkpoint whose config.json names another model_type than modeling.py builds (here:
    GPT-2)."""
    checkpoint = tmp_path / "gpt2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(
        SystemExit,
        match=r"trained with another modeling.py \(model_type gpt2; this modeling.py "
        r"builds template-classifier\)",
    ):
        predict.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--input_file",
                str(tiny_data / "valid.jsonl"),
                "--output_file",
                str(tmp_path / "out.jsonl"),
            ]
        )
