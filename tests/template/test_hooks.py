"""The optional hooks of modeling.py get what a generative task needs: the unwrapped model (in eval
mode, without gradients: it may generate) and the tokenizer, on every process, gathered. The fork
here replaces the pinned pair's metric_inputs() and predictions() by ones that use both."""

import json

from conftest import TREE, data_args, fork, launch, read_json

HOOKS = """

def metric_inputs(model, tokenizer, batch, outputs):  # the forker's: it runs the model itself
    import os
    assert type(model) is Model and not model.training and not torch.is_grad_enabled()
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {len(batch['labels'])} {type(tokenizer).__name__}\\n")
    return {"predictions": model(**batch).logits.argmax(-1), "labels": batch["labels"]}


def predictions(model, tokenizer, batch, outputs):
    return [{"text": tokenizer.decode(ids, skip_special_tokens=True), "label": model.config.id2label[i]}
            for ids, i in zip(batch["input_ids"].tolist(), outputs.logits.argmax(-1).tolist())]
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
    valid_log = read_json(outdir / "log.json")["Epoch 0"]["valid_log"]
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
