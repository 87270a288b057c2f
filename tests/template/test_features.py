"""The options around the loop, end to end: --metric_for_best, --early_stopping_patience,
--sample_every, --group_by_length, --report_to, --freeze_backbone; each one survives a resume.

    pytest tests/template/test_features.py
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

import predict
import train
from conftest import (
    STEPS_PER_EPOCH,
    TREE,
    assert_bitwise_equal,
    common_args,
    data_args,
    read_json,
    run,
    tiny_tokenizer,
    weights,
)
from core import options
from core.checkpoint import load_tensors
from dataset import generate_dataset
from modeling import Model

FAST = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


def stopped_and_resumed(args, outdir, stop, processes=1):
    run(*args, "--outdir", outdir, "--stop_after_steps", stop, processes=processes)
    return run("--resume", outdir / "last", processes=processes)


def test_metric_for_best_accuracy_decides_best_and_its_value_survives_resume(tiny_data, tmp_path):
    args = [
        *data_args(tiny_data),
        *FAST,
        "--epochs",
        3,
        "--lr",
        3e-3,
        "--metric_for_best",
        "accuracy",
    ]
    run(*args, "--outdir", tmp_path / "whole")
    stopped_and_resumed(args, tmp_path / "resumed", 2 * STEPS_PER_EPOCH)

    log = read_json(tmp_path / "whole" / "log.json")
    accuracies = [entry["valid_log"]["accuracy"] for entry in log.values()]
    best = read_json(tmp_path / "whole" / "best" / "trainer_state.json")
    assert best["best_metric"] == max(accuracies)
    assert (
        best["epoch"] == accuracies.index(max(accuracies)) + 1
    )  # best/ is that epoch's checkpoint
    assert read_json(tmp_path / "resumed" / "log.json") == log
    assert read_json(tmp_path / "resumed" / "last" / "trainer_state.json")["best_metric"] == max(
        accuracies
    )
    assert_bitwise_equal(tmp_path / "whole" / "best", tmp_path / "resumed" / "best")


def test_early_stopping_counter_survives_resume(tiny_data, tmp_path):
    # With --lr 0 the valid loss never improves after epoch 0: patience 2 stops before epoch 3.
    args = [*data_args(tiny_data), *FAST, "--epochs", 6, "--lr", 0, "--early_stopping_patience", 2]
    whole = run(*args, "--outdir", tmp_path / "whole")
    assert list(read_json(tmp_path / "whole" / "log.json")) == ["Epoch 0", "Epoch 1", "Epoch 2"]
    assert (
        "Early stopping: valid loss has not improved" in whole.stdout
        and "for 2 epochs" in whole.stdout
    )
    resumed = stopped_and_resumed(
        args, tmp_path / "resumed", 2 * STEPS_PER_EPOCH
    )  # after epoch 1: 1 bad epoch
    assert list(read_json(tmp_path / "resumed" / "log.json")) == ["Epoch 0", "Epoch 1", "Epoch 2"]
    assert "Early stopping" in resumed.stdout
    assert read_json(tmp_path / "resumed" / "last" / "trainer_state.json")["bad_epochs"] == 2


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
    assert read_json(outdir / "log.json") == read_json(reference(processes) / "log.json")


@pytest.mark.slow
def test_group_by_length_with_two_processes_resumes_bitwise(tiny_data, reference, tmp_path):
    args = [*common_args(tiny_data, 2), "--group_by_length"]
    run(*args, "--outdir", tmp_path / "whole", processes=2)
    stopped_and_resumed(args, tmp_path / "resumed", STEPS_PER_EPOCH + 7, processes=2)
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "resumed" / "last")
    assert read_json(tmp_path / "resumed" / "log.json") == read_json(
        tmp_path / "whole" / "log.json"
    )
    grouped, shuffled = weights(tmp_path / "whole" / "last"), weights(reference(2) / "last")
    assert not torch.equal(
        grouped["head.weight"], shuffled["head.weight"]
    )  # another batch order was used
    log = read_json(tmp_path / "whole" / "log.json")
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]


def test_report_to_tensorboard_logs_train_every_n_steps_and_valid_every_epoch(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(
        *data_args(tiny_data),
        *FAST,
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
    assert [e.step for e in events.Scalars("train/loss")] == [
        8,
        16,
        20,
        24,
        32,
        40,
    ]  # and each epoch's end
    assert [e.step for e in events.Scalars("train/lr")] == [8, 16, 20, 24, 32, 40]
    log = read_json(tmp_path / "log.json")
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
        *FAST,
        "--epochs",
        2,
        "--freeze_backbone",
        "--model_name_or_path",
        pretrained,
    ]
    run(*args, "--outdir", tmp_path / "whole")
    stopped_and_resumed(args, tmp_path / "model", STEPS_PER_EPOCH + 5)
    # Bitwise, with a pretrained encoder too (from_pretrained() leaves it in eval mode: train.py sets train mode).
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "model" / "last")
    assert backbone_is_untouched(tmp_path / "model" / "last", pretrained)
    optimizer = load_tensors(tmp_path / "model" / "last" / "optimizer.pt")
    assert len(optimizer["state"]) == 2  # AdamW holds moments for head.weight and head.bias only


def test_lora_adapters_train_resume_bitwise_and_load_back(tiny_data, pretrained, tmp_path):
    args = [
        *data_args(tiny_data),
        *FAST,
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

    # from_pretrained() finds adapter_config.json and loads the adapters too: the valid loss logged for best/.
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
    loss = lambda: sum(model(**batch).loss.item() for batch in batches) / len(batches)
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


def test_gradient_checkpointing_is_bitwise_the_same_run(tiny_data, tmp_path):
    """Recomputing activations in backward (with the dropout masks of the forward pass) changes memory, not results."""
    args = [*data_args(tiny_data), *FAST, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "plain")
    run(*args, "--outdir", tmp_path / "checkpointed", "--gradient_checkpointing")
    assert_bitwise_equal(tmp_path / "plain" / "last", tmp_path / "checkpointed" / "last")
    assert (
        read_json(tmp_path / "checkpointed" / "last" / "my_config.json")["gradient_checkpointing"]
        is True
    )


def test_loader_workers_read_the_same_batches(tiny_data, tmp_path):
    """Rows read from the cache file in DataLoader workers: the same batches, the same run."""
    args = [*data_args(tiny_data), *FAST, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "plain")
    run(*args, "--outdir", tmp_path / "workers", "--num_workers", 2)
    assert_bitwise_equal(tmp_path / "plain" / "last", tmp_path / "workers" / "last")


@pytest.mark.slow  # inductor compiles for a few minutes on 2 CPU cores
def test_torch_compile_trains_the_same_model(tiny_data, tmp_path):
    args = [*data_args(tiny_data), *FAST, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "eager")
    run(*args, "--outdir", tmp_path / "compiled", "--torch_compile")
    eager, compiled = weights(tmp_path / "eager" / "last"), weights(tmp_path / "compiled" / "last")
    assert eager.keys() == compiled.keys()  # saved without the compiled wrapper's _orig_mod. prefix
    assert all(eager[k].shape == compiled[k].shape for k in eager)
    # Inductor draws its own dropout masks (torch._inductor.config.fallback_random is off), so the two runs
    # are not the same run; they must still learn the same task about as well.
    valid = [
        read_json(tmp_path / run / "log.json")["Epoch 0"]["valid_log"]["loss"]
        for run in ("eager", "compiled")
    ]
    assert valid[1] == pytest.approx(valid[0], rel=0.1)


def test_a_tiny_max_grad_norm_clips_the_gradients_the_optimizer_uses(
    tiny_data, tmp_path, monkeypatch
):
    """The clipped parameters are the prepared model's (FSDP2 swaps them for sharded ones in prepare())."""
    from accelerate import Accelerator

    norms, clip = [], Accelerator.clip_grad_norm_

    def recording(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        total = clip(self, parameters, max_norm, norm_type)
        norms.append(
            torch.stack([p.grad.norm() for p in parameters]).norm().item()
        )  # after clipping
        assert all(p.grad is not None for p in parameters)  # the parameters that got the gradients
        return total

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording)
    run(
        *data_args(tiny_data),
        *FAST,
        "--epochs",
        1,
        "--max_grad_norm",
        1e-3,
        "--outdir",
        tmp_path / "model",
    )
    assert len(norms) == STEPS_PER_EPOCH and max(norms) == pytest.approx(1e-3, rel=1e-3)


def test_deepspeed_is_refused_before_anything_is_written(tiny_data, tmp_path, monkeypatch):
    """DeepSpeed cannot be installed here: its distributed type is stood in for, to check that the
    run stops with one line naming the supported engine, before any output exists."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(
        Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED)
    )
    with pytest.raises(SystemExit) as stopped:
        train.main([str(a) for a in (*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model")])
    assert str(stopped.value.code) == (
        "error: DeepSpeed is not supported by this template: FSDP2 is its sharded "
        "engine (configs/accelerate/fsdp.yaml; tested sharded on CPU, with exact resume)."
    )
    assert not (tmp_path / "model").exists()


def test_lora_on_a_model_without_weights_says_adapters_need_a_pretrained_backbone(
    tiny_data, pretrained, tmp_path
):
    args = [
        *data_args(tiny_data),
        *FAST,
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
