"""One optimizer step: the same update however the batch is split, clipping, the LR schedule.

A loss that is a mean over tokens (the causal LM example: modeling.loss_items counts them) weighs
every token of an optimizer step alike, over the accumulation window and the processes:
--batch_size 16, 8 x --accumulation 2, 4 x 4 and 2 processes x 8 end 21 steps (the last one
shorter) at the same weights to float noise, with and without --group_by_length, and so does a
resume from 2 processes onto 1. Dropout is off in these models: it draws other masks for other
splits. Then clipping, and every --lr_scheduler_type over the whole run.

    python -m pytest -q tests/template/test_step.py
    python -m pytest -q -m slow tests/template/test_step.py    # 2 processes, elastic resume
"""

import json
import shutil

import pytest
import torch

import conftest
import train
from conftest import (
    ROOT,
    STEPS_PER_EPOCH,
    TREE,
    data_args,
    epochs,
    launch,
    read_json,
    read_log,
    run,
    weights,
)

# ------------------------------------------------------- the same update however the batch is split


EXAMPLE = ROOT / "examples" / "causal_lm"


ROWS = 330  # 20 steps of 16 and a last, shorter one of 10


SPLITS = {
    "16": ["--batch_size", 16],
    "8x2": ["--batch_size", 8, "--accumulation", 2],
    "4x4": ["--batch_size", 4, "--accumulation", 4],
}


FLOAT_NOISE = 1e-5  # relative L2 distance of all weights after 21 steps; the bar


def distance(a, b):
    """|a - b| / |b| over all the weights together (float64)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return (
        (
            sum((wa[k].double() - wb[k].double()).pow(2).sum() for k in wa)
            / sum(wb[k].double().pow(2).sum() for k in wb)
        )
        .sqrt()
        .item()
    )


def without_dropout(source, destination, keys):
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, **{k: 0.0 for k in keys}}))
    return destination


def lm_data(folder, rows):
    """The causal LM example's tiny GPT-2 without dropout, and the first `rows` lines of its
    data."""
    without_dropout(
        EXAMPLE / "tiny-gpt2", folder / "tiny-gpt2", ["resid_pdrop", "embd_pdrop", "attn_pdrop"]
    )
    for split, count in [("train", rows), ("valid", 40)]:
        lines = (EXAMPLE / "data" / f"{split}.txt").read_text().splitlines()[:count]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    return lm_data(tmp_path_factory.mktemp("causal-lm"), ROWS)


def lm_args(folder):
    return [
        "--model_name_or_path",
        folder / "tiny-gpt2",
        "--train_file",
        folder / "train.txt",
        "--valid_file",
        folder / "valid.txt",
        "--epochs",
        1,
        "--lr",
        3e-3,
        "--num_warmup_steps",
        3,
        "--max_grad_norm",
        0,
    ]  # no clipping: the update is the gradient's


@pytest.fixture
def causal_lm(monkeypatch):
    """train.py with the causal LM example's pair, in this process, for one test; one example a
    text (not packed): lengths that vary, what a token-weighted loss is about."""
    conftest.activate("causal_lm")
    monkeypatch.setattr(conftest.PAIRS["causal_lm"]["dataset"], "PACK", False)
    yield
    conftest.activate("template")


@pytest.mark.parametrize("grouped", [[], ["--group_by_length"]], ids=["shuffled", "grouped"])
def test_a_token_mean_gives_the_same_update_however_the_batch_is_split(
    grouped, causal_lm, lm_files, tmp_path
):
    for name, split in SPLITS.items():
        run(*lm_args(lm_files), *split, *grouped, "--outdir", tmp_path / name)
    apart = {
        name: distance(tmp_path / name / "last", tmp_path / "16" / "last")
        for name in ("8x2", "4x4")
    }
    print(f"relative distance to --batch_size 16 after 21 steps {grouped}: {apart}")
    assert 0 < max(apart.values()) <= FLOAT_NOISE, apart
    logs = [read_log(tmp_path / name / "log.json")["Epoch 0"] for name in SPLITS]
    # The logged losses are token-weighted means too: the same for every split.
    for key in ("train_log", "valid_log"):
        assert [log[key]["loss"] for log in logs] == pytest.approx(
            [logs[0][key]["loss"]] * 3, rel=1e-5
        )


def test_without_the_count_the_split_changes_the_update(causal_lm, lm_files, tmp_path, monkeypatch):
    """The control: the same example with loss_items taken away weighs each micro-batch alike (each
    token by 1 / its micro-batch's tokens), and the splits drift apart far beyond float noise."""
    monkeypatch.delattr(conftest.PAIRS["causal_lm"]["modeling"], "loss_items")
    for name in ("16", "8x2"):
        run(*lm_args(lm_files), *SPLITS[name], "--outdir", tmp_path / name)
    apart = distance(tmp_path / "8x2" / "last", tmp_path / "16" / "last")
    print(f"causal LM without loss_items, 8 x 2 against 16: {apart:.2e}")
    assert apart > 100 * FLOAT_NOISE


def check_split(folder, tmp_path):
    """train.py --check on the causal LM: its `split` line."""
    result = run(
        *lm_args(folder), "--batch_size", 16, "--outdir", tmp_path / "model", "--check", check=False
    )
    return [line for line in result.stdout.splitlines() if line[6:].startswith("split ")]


def test_check_warns_of_an_uncounted_token_mean_and_passes_a_counted_one(
    causal_lm, lm_files, tmp_path, monkeypatch
):
    (counted,) = check_split(lm_files, tmp_path)
    assert (
        counted.startswith(
            "PASS  split      one step at --batch_size 16 and at 8 x --accumulation 2 give the "
            "same gradient"
        )
        and "loss_items() counts the items" in counted
    )
    monkeypatch.delattr(conftest.PAIRS["causal_lm"]["modeling"], "loss_items")
    (uncounted,) = check_split(lm_files, tmp_path)
    assert (
        uncounted.startswith(
            "WARN  split      one step at --batch_size 16 and at 8 x --accumulation 2 give "
            "gradients"
        )
        and "(add loss_items(batch) to modeling.py" in uncounted
    )
    print(counted, uncounted, sep="\n")


def test_a_mean_over_examples_needs_no_count(tiny_data, tmp_path, monkeypatch):
    """The default classification task says nothing (its loss is a mean over examples, and
    micro-batches of one size weigh alike): --batch_size 16 and 8 x 2 give the same update to float
    noise."""
    model = without_dropout(
        TREE / "assets" / "tiny-bert",
        tmp_path / "tiny-bert",
        ["hidden_dropout_prob", "attention_probs_dropout_prob"],
    )
    monkeypatch.setattr(
        torch.nn.Dropout, "forward", lambda self, x: x
    )  # the head's classifier_dropout
    for name in ("16", "8x2"):
        run(
            *data_args(tiny_data),
            *SPLITS[name],
            "--epochs",
            1,
            "--model_name_or_path",
            model,
            "--outdir",
            tmp_path / name,
        )
    apart = distance(tmp_path / "8x2" / "last", tmp_path / "16" / "last")
    print(f"classification, 8 x 2 against 16: {apart:.2e}")
    assert apart <= FLOAT_NOISE


def lm_fork(folder):
    """A copy of the template with the causal LM example's pair over modeling.py and dataset.py,
    one example a text (not packed: lengths that vary)."""
    fork = folder / "fork"
    shutil.copytree(TREE, fork)
    for name in ("modeling.py", "dataset.py"):
        shutil.copy(EXAMPLE / name, fork / name)
    source = (fork / "dataset.py").read_text()
    assert source.count("PACK = True") == 1
    (fork / "dataset.py").write_text(source.replace("PACK = True", "PACK = False"))
    return fork


@pytest.mark.slow
def test_two_processes_give_the_update_of_one_and_an_elastic_resume_keeps_it(tmp_path):
    # 320 rows, 20 whole steps: a last batch shorter than the others would be filled up on one
    # process with examples from the start (accelerate's even_batches), which one process never
    # sees.
    lm_files, fork = lm_data(tmp_path / "data", 320), lm_fork(tmp_path)
    launch(*lm_args(lm_files), *SPLITS["16"], "--outdir", tmp_path / "16", cwd=fork)
    launch(
        *lm_args(lm_files), "--batch_size", 8, "--outdir", tmp_path / "2x8", processes=2, cwd=fork
    )
    assert read_json(tmp_path / "2x8" / "last" / "trainer_state.json")["num_processes"] == 2
    apart = distance(tmp_path / "2x8" / "last", tmp_path / "16" / "last")
    print(f"2 processes x 8 against --batch_size 16 on 1 process: {apart:.2e}")
    assert 0 < apart <= FLOAT_NOISE

    # Stopped on 2 processes x 8, resumed on 1 (--accumulation 1 -> 2): the update stays the same.
    outdir = tmp_path / "elastic"
    launch(
        *lm_args(lm_files),
        "--batch_size",
        8,
        "--outdir",
        outdir,
        "--stop_after_steps",
        9,
        processes=2,
        cwd=fork,
    )
    result = launch("--resume", outdir / "last", cwd=fork)
    assert "resuming on 1 process(es) instead of 2: --accumulation 1 -> 2" in result.stderr
    apart = distance(outdir / "last", tmp_path / "16" / "last")
    print(f"elastic 2 -> 1 against --batch_size 16 on 1 process: {apart:.2e}")
    assert apart <= FLOAT_NOISE


# ---------------------------------------------------------------- gradient clipping


BATCH_16 = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


def test_a_tiny_max_grad_norm_clips_the_gradients_the_optimizer_uses(
    tiny_data, tmp_path, monkeypatch
):
    """The clipped parameters are the prepared model's (FSDP2 swaps them for sharded ones in
    prepare())."""
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
        *BATCH_16,
        "--epochs",
        1,
        "--max_grad_norm",
        1e-3,
        "--outdir",
        tmp_path / "model",
    )
    assert len(norms) == STEPS_PER_EPOCH and max(norms) == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------- the LR schedule


@pytest.mark.parametrize(
    "kind, final_lr",
    [
        ("linear", 0.0),
        ("cosine", 0.0),
        ("cosine_with_restarts", 0.0),
        ("polynomial", 1e-7),
        ("constant", 1e-3),
        ("constant_with_warmup", 1e-3),
    ],
)
def test_every_scheduler_spans_the_whole_run(kind, final_lr, tiny_data, tmp_path):
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--lr_scheduler_type",
            kind,
            "--num_warmup_steps",
            "5",
            "--epochs",
            "2",
            "--batch_size",
            "32",
            "--outdir",
            str(tmp_path),
        ]
    )
    lrs = [entry["train_log"]["lr"] for entry in epochs(read_log(tmp_path / "log.json")).values()]
    assert lrs[-1] == pytest.approx(final_lr, abs=1e-12)
    if kind in (
        "linear",
        "constant_with_warmup",
    ):  # 10 steps per epoch: halfway through, warmup is over
        assert lrs[0] == pytest.approx(1e-3 * (10 / 15 if kind == "linear" else 1), rel=1e-9)


@pytest.mark.slow
def test_schedule_is_the_same_for_1_and_2_processes_and_accumulation(reference):
    """Same global batch three ways (1 process x accumulation 2, 2 processes): the same lr per
    epoch."""
    logs = [read_log(reference(p) / "log.json") for p in (1, 2)]
    lrs = [[entry["train_log"]["lr"] for entry in epochs(log).values()] for log in logs]
    assert lrs[0] == pytest.approx([1e-3 * 20 / 35, 0.0], rel=1e-9)
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-9)
