"""A pretrained backbone: --lora_r adapters and --freeze_backbone.

Each trains what it should, resumes bitwise and loads back with from_pretrained and predict.py;
adapters on a model without weights are said to learn little.

    python -m pytest -q tests/template/test_lora.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

import predict
from conftest import (
    STEPS_PER_EPOCH,
    TREE,
    assert_bitwise_equal,
    data_args,
    read_json,
    run,
    stopped_and_resumed,
    tiny_tokenizer,
    weights,
)
from core import options
from core.checkpoint import load_tensors
from dataset import generate_dataset
from modeling import Model

BATCH_16 = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A directory like a hub checkpoint: tiny-bert's config and tokenizer with (random) weights."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()
    BertModel(
        BertConfig.from_pretrained(TREE / "assets" / "tiny-bert", vocab_size=len(tokenizer))
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def backbone_is_untouched(checkpoint, pretrained):
    trained, initial = weights(checkpoint), weights(pretrained)
    encoder = {
        k.removeprefix("encoder."): v for k, v in trained.items() if k.startswith("encoder.")
    }
    return encoder.keys() == initial.keys() - {"pooler.dense.weight", "pooler.dense.bias"} and all(
        torch.equal(v, initial[k]) for k, v in encoder.items()
    )


def test_freeze_backbone_trains_the_head_only_and_resumes(tiny_data, pretrained, tmp_path):
    args = [
        *data_args(tiny_data),
        *BATCH_16,
        "--epochs",
        2,
        "--freeze_backbone",
        "--model_name_or_path",
        pretrained,
    ]
    run(*args, "--outdir", tmp_path / "whole")
    stopped_and_resumed(args, tmp_path / "model", STEPS_PER_EPOCH + 5)
    # Bitwise, with a pretrained encoder too (from_pretrained() leaves it in eval mode: train.py
    # sets train mode).
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "model" / "last")
    assert backbone_is_untouched(tmp_path / "model" / "last", pretrained)
    optimizer = load_tensors(tmp_path / "model" / "last" / "optimizer.pt")
    assert len(optimizer["state"]) == 2  # AdamW holds moments for head.weight and head.bias only


def test_lora_adapters_train_resume_bitwise_and_load_back(tiny_data, pretrained, tmp_path):
    args = [
        *data_args(tiny_data),
        *BATCH_16,
        "--epochs",
        2,
        "--lr",
        3e-3,
        "--lora_r",
        4,
        "--lora_target_modules",
        "query,value",
        "--model_name_or_path",
        pretrained,
    ]
    run(*args, "--outdir", tmp_path / "whole")
    stopped_and_resumed(args, tmp_path / "resumed", STEPS_PER_EPOCH + 5)
    whole, resumed = tmp_path / "whole" / "last", tmp_path / "resumed" / "last"
    for name in ("model.safetensors", "adapter_model.safetensors"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()
    assert backbone_is_untouched(
        whole, pretrained
    )  # model.safetensors: the frozen base and the trained head
    adapters = load_file(whole / "adapter_model.safetensors")
    assert len(adapters) == 2 * 2 * 2  # lora_A and lora_B of query and value in both layers
    assert all(
        v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k
    )  # trained: they start at zero
    optimizer = load_tensors(whole / "optimizer.pt")
    assert len(optimizer["state"]) == len(adapters) + 2  # the adapters and the head

    # from_pretrained() finds adapter_config.json and loads the adapters too: the valid loss logged
    # for best/.
    best = tmp_path / "whole" / "best"
    model = Model.from_pretrained(best).eval()
    assert model.active_adapters() == ["default"]
    valid = generate_dataset(
        tiny_data / "valid.jsonl",
        "validation",
        AutoTokenizer.from_pretrained(best),
        options.parse_args([]),
        list(model.config.label2id),
    )
    batches = [
        valid.collate([valid[i] for i in range(k, k + 16)]) for k in range(0, len(valid), 16)
    ]

    def loss():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)

    with torch.no_grad():
        with_adapters = loss()
        model.disable_adapters()
        without_adapters = loss()
    logged = read_json(best / "trainer_state.json")["best_metric"]
    assert with_adapters == pytest.approx(logged, rel=1e-6)
    assert abs(without_adapters - logged) > 20 * abs(
        with_adapters - logged
    )  # a few steps of LoRA: a small change

    # predict.py loads best/ the same way: its scores are those of the model with the adapters on.
    predict.main(
        [
            "--checkpoint",
            str(best),
            "--input_file",
            str(tiny_data / "valid.jsonl"),
            "--output_file",
            str(tmp_path / "predictions.jsonl"),
        ]
    )
    predicted = [
        json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()
    ]
    model.enable_adapters()
    with torch.no_grad():
        scores = torch.cat([model(**batch).logits.softmax(-1).max(-1).values for batch in batches])
    assert [row["score"] for row in predicted] == pytest.approx(scores.tolist(), abs=1e-5)


def test_lora_on_a_model_without_weights_says_adapters_need_a_pretrained_backbone(
    tiny_data, pretrained, tmp_path
):
    args = [
        *data_args(tiny_data),
        *BATCH_16,
        "--lora_r",
        4,
        "--lora_target_modules",
        "query,value",
        "--stop_after_steps",
        1,
    ]
    result = run(*args, "--outdir", tmp_path / "scratch")  # assets/tiny-bert: a config only
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: --lora_r")]
    assert warned == [
        "warning: --lora_r on assets/tiny-bert, which holds no weights: its backbone is random and "
        "stays frozen, so the adapters learn little. LoRA needs a pretrained backbone: give one (a "
        "hub id, or the best/ of a full run), or drop --lora_r to train every weight."
    ]
    result = run(*args, "--outdir", tmp_path / "pretrained", "--model_name_or_path", pretrained)
    assert "warning: --lora_r" not in result.stderr
