"""The default modeling.py: the contract train.py relies on, a save/load round trip, a pretrained
encoder folder, another encoder architecture.

    pytest tests/task/test_model.py
"""

import pytest
import torch
from test_data import TOKENIZER, load
from transformers import BertConfig, BertModel, DistilBertConfig

import train
from conftest import ROOT, data_args, epochs
from modeling import Model, build_model


def test_model_contract_and_save_load_round_trip(tmp_path):
    train_set = load(ROOT / "data" / "valid.jsonl")
    torch.manual_seed(0)
    model = build_model(str(ROOT / "assets" / "tiny-bert"), train_set).eval()
    batch = train_set.collate([train_set[i] for i in range(5)])
    outputs = model(**batch)
    assert outputs.loss.dim() == 0 and outputs.logits.shape == (5, 3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = Model.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**batch).logits, outputs.logits)
    assert loaded.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}


def test_a_pretrained_encoder_directory_is_fine_tuned_with_its_weights(tmp_path):
    """--model_name_or_path DIR with weights: the encoder starts from them (a hub id goes the same
    way)."""
    torch.manual_seed(1)
    encoder = BertModel(
        BertConfig(
            vocab_size=len(TOKENIZER),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )
    encoder.save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    model = build_model(str(tmp_path), load(ROOT / "data" / "valid.jsonl"))
    saved = encoder.state_dict()
    assert all(
        torch.equal(value, saved[name]) for name, value in model.encoder.state_dict().items()
    )
    assert model.config.encoder["intermediate_size"] == 37


def test_another_encoder_architecture_trains_end_to_end(tiny_data, tmp_path):
    """DistilBERT takes no token_type_ids and has no pooler: train.py and the head do not care."""
    folder = tmp_path / "distilbert"
    DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(
        folder
    )
    TOKENIZER.save_pretrained(folder)
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--model_name_or_path",
            str(folder),
            "--epochs",
            "1",
            "--outdir",
            str(tmp_path / "model"),
        ]
    )
    assert (
        Model.from_pretrained(tmp_path / "model" / "last").config.encoder["model_type"]
        == "distilbert"
    )


def test_a_modeling_py_with_only_model_and_build_model_trains_resumes_and_predicts(
    tiny_data, tmp_path, monkeypatch, capfd
):
    """The optional hooks gone (metrics, samples, predictions): validation reports the loss only,
    and predict.py writes the model's raw outputs."""
    import json

    import dataset
    import modeling
    import predict

    for hook in ("metric_inputs", "compute_metrics", "format_samples", "predictions"):
        monkeypatch.delattr(modeling, hook)
    outdir = tmp_path / "model"
    args = [
        *map(str, data_args(tiny_data)),
        "--batch_size",
        "32",
        "--epochs",
        "2",
        "--outdir",
        str(outdir),
    ]
    train.main([*args, "--stop_after_steps", "13"])
    train.main(["--resume", str(outdir / "last")])
    assert "validation reports the loss only" in capfd.readouterr().out
    log = json.loads((outdir / "log.json").read_text())
    assert [set(entry["valid_log"]) for entry in epochs(log).values()] == [{"loss"}, {"loss"}]
    predict.main(
        [
            "--checkpoint",
            str(outdir / "best"),
            "--input_file",
            str(tiny_data / "valid.jsonl"),
            "--output_file",
            str(tmp_path / "out.jsonl"),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 64
        and set(rows[0]) == {"index", "logits", "embeddings"}
        and len(rows[0]["logits"]) == 3
    )
    model = Model.from_pretrained(outdir / "best").eval()
    tokenizer = dataset.load_tokenizer(outdir / "best", None)
    text = json.loads((tiny_data / "valid.jsonl").read_text().splitlines()[0])["text"]
    with torch.no_grad():
        logits = model(**tokenizer([text], return_tensors="pt")).logits[0]
    assert rows[0]["logits"] == pytest.approx(
        logits.tolist(), abs=1e-5
    )  # batch of 64 vs 1: float sums differ
