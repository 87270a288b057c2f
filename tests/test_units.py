"""Focused checks of the pieces: option files, data formats, the model contract, the schedulers.

    pytest tests/test_units.py
"""
import pytest
import torch
from transformers import BertConfig, BertModel, DistilBertConfig

import train
from conftest import ROOT, data_args, read_json, tiny_tokenizer
from dataset import generate_dataset
from modeling import Model, build_model

TOKENIZER = tiny_tokenizer()


def load(path, max_len=128, labels=None):
    """dataset.py as train.py calls it, with the default options."""
    return generate_dataset(path, "train", TOKENIZER, train.parse_args(["--max_len", str(max_len)]), labels)


def test_option_precedence_defaults_then_config_file_then_flags(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("# comments are fine\nepochs: 7\nlr: 0.01\n")
    args = train.parse_args(["--config", str(config), "--lr", "0.5"])
    assert (args.epochs, args.lr, args.batch_size) == (7, 0.5, 32)
    json_config = tmp_path / "options.json"
    json_config.write_text('{"batch_size": 4}')
    assert train.parse_args(["--config", str(json_config)]).batch_size == 4


def test_resume_takes_the_checkpoints_options_and_refuses_a_changed_one(tmp_path):
    checkpoint = tmp_path / "last"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text('{"files": {}}')
    (checkpoint / "my_config.json").write_text('{"epochs": 4, "batch_size": 8, "outdir": "elsewhere", '
                                               '"stop_after_steps": 3}')
    args = train.parse_args(["--resume", str(checkpoint), "--epochs", "6"])
    assert (args.epochs, args.batch_size, args.outdir, args.stop_after_steps) == (6, 8, "elsewhere", 0)
    with pytest.raises(SystemExit, match="--batch_size 16 differs from .*'s 8"):
        train.parse_args(["--resume", str(checkpoint), "--batch_size", "16"])
    assert train.parse_args(["--resume", str(checkpoint), "--batch_size", "16", "--ignore_mismatch"]).batch_size == 16


def test_jsonl_csv_and_tsv_give_the_same_dataset(tmp_path):
    rows = [("the food was great", "positive"), ('he said "meh', "neutral"), ("awful, truly", "negative")]
    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "{t.replace(chr(34), chr(92) + chr(34))}", "label": "{l}"}}\n'
                                              for t, l in rows))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{l}\n' for t, l in rows))
    # GLUE-style TSV: a UTF-8 BOM, an unbalanced quote, an extra column
    (tmp_path / "a.tsv").write_text("\ufeffid\ttext\tlabel\n" + "".join(f"{i}\t{t}\t{l}\n" for i, (t, l) in enumerate(rows)),
                                    encoding="utf-8")
    datasets = [load(tmp_path / f"a.{ext}", 32) for ext in ("jsonl", "csv", "tsv")]
    for dataset in datasets:
        assert dataset.labels == ["negative", "neutral", "positive"]
        assert [dataset[i] for i in range(3)] == [datasets[0][i] for i in range(3)]
    assert datasets[0][0]["labels"] == 2


def test_collate_pads_per_batch_not_to_max_len():
    dataset = load(ROOT / "data" / "valid.jsonl")
    batch = dataset.collate([dataset[i] for i in range(4)])
    longest = max(len(dataset[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and longest < 128
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["attention_mask"].sum().item() == sum(len(dataset[i]["input_ids"]) for i in range(4))


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
    """--model_name_or_path DIR with weights: the encoder starts from them (a hub id goes the same way)."""
    torch.manual_seed(1)
    encoder = BertModel(BertConfig(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37))
    encoder.save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    model = build_model(str(tmp_path), load(ROOT / "data" / "valid.jsonl"))
    saved = encoder.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.encoder.state_dict().items())
    assert model.config.encoder["intermediate_size"] == 37


def test_another_encoder_architecture_trains_end_to_end(tiny_data, tmp_path):
    """DistilBERT takes no token_type_ids and has no pooler: train.py and the head do not care."""
    folder = tmp_path / "distilbert"
    DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    train.main([*map(str, data_args(tiny_data)), "--model_name_or_path", str(folder), "--epochs", "1",
                "--outdir", str(tmp_path / "model")])
    assert Model.from_pretrained(tmp_path / "model" / "last").config.encoder["model_type"] == "distilbert"


@pytest.mark.parametrize("kind, final_lr", [("linear", 0.0), ("cosine", 0.0), ("cosine_with_restarts", 0.0),
                                            ("polynomial", 1e-7), ("constant", 1e-3), ("constant_with_warmup", 1e-3)])
def test_every_scheduler_spans_the_whole_run(kind, final_lr, tiny_data, tmp_path):
    train.main([*map(str, data_args(tiny_data)), "--lr_scheduler_type", kind, "--num_warmup_steps", "5",
                "--epochs", "2", "--batch_size", "32", "--outdir", str(tmp_path)])
    lrs = [entry["train_log"]["lr"] for entry in read_json(tmp_path / "log.json").values()]
    assert lrs[-1] == pytest.approx(final_lr, abs=1e-12)
    if kind in ("linear", "constant_with_warmup"):  # 10 steps per epoch: halfway through, warmup is over
        assert lrs[0] == pytest.approx(1e-3 * (10 / 15 if kind == "linear" else 1), rel=1e-9)
