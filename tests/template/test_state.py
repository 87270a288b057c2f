"""State as a dict of objects: what train.py hands the checkpoint code (`objects`) is saved and
restored whole, so that adding state is one line. The forked runs here edit a copy of train.py the
way a forker would (the same lines of text), run it as `python train.py`, and stop and resume it
against the run that was never stopped.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TREE, assert_bitwise_equal, data_args, fork, read_json
from core import checkpoint, runtime

OBJECTS = '    objects = {"optimizer": optimizer, "scheduler": scheduler}\n'
STEP = "            optimizer.zero_grad()\n"
SETUP = "    runtime.shard_fsdp_on_cpu(accelerator)\n"
# An EMA of the weights: its creation and the one line that adds it to what is saved ...
EMA = (
    OBJECTS + "    ema = torch.optim.swa_utils.AveragedModel(accelerator.unwrap_model(model), "
    "multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))\n"
    '    objects["ema"] = ema\n'
)
EMA_UPDATE = STEP + '            objects["ema"].update_parameters(model)\n'  # ... and its update
# fp16's loss scaler, as accelerate makes it on a GPU (it makes none on CPU): a real GradScaler,
# which doubles its scale after every step without an overflow (a resume that started it afresh
# ends at other weights, and at another scale).
SCALER = SETUP + (
    '    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=2.0, '
    "growth_interval=1)\n"
)


def train(tree, *args):
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_ema_and_a_loss_scaler_added_by_a_forker_resume_bitwise(tiny_data, tmp_path):
    tree = fork(tmp_path, {"train.py": {OBJECTS: EMA, STEP: EMA_UPDATE, SETUP: SCALER}})
    args = [
        *data_args(tiny_data),
        "--model_name_or_path",
        TREE / "assets" / "tiny-bert",
        "--epochs",
        1,
        "--batch_size",
        16,
    ]
    train(tree, *args, "--outdir", tmp_path / "whole")
    train(tree, *args, "--outdir", tmp_path / "stopped", "--stop_after_steps", 9)
    stopped = tmp_path / "stopped" / "last"
    saved = checkpoint.load_tensors(stopped / "scaler.pt")
    assert saved["scale"] == 2.0**19, saved  # 9 steps, none overflowed
    assert {"ema.pt", "scaler.pt"} <= set(read_json(stopped / "manifest.json")["files"])
    train(tree, "--resume", stopped)

    assert_bitwise_equal(tmp_path / "whole" / "last", stopped)
    ema, expected = (
        checkpoint.load_tensors(folder / "last" / "ema.pt")
        for folder in (tmp_path / "stopped", tmp_path / "whole")
    )
    assert ema.keys() == expected.keys() and all(ema[k].equal(expected[k]) for k in ema)
    assert int(ema["n_averaged"]) == 20  # one update per optimizer step, across the resume
    scaler = checkpoint.load_tensors(stopped / "scaler.pt")
    assert scaler == checkpoint.load_tensors(tmp_path / "whole" / "last" / "scaler.pt")
    assert scaler["scale"] == 2.0**30  # a scaler started afresh on resume would end at 2**21


def test_a_checkpoint_without_an_object_that_train_py_now_has_is_refused_by_name(
    tiny_data, tmp_path
):
    args = [
        *data_args(tiny_data),
        "--model_name_or_path",
        TREE / "assets" / "tiny-bert",
        "--epochs",
        1,
    ]
    train(fork(tmp_path), *args, "--outdir", tmp_path / "model", "--stop_after_steps", 2)
    shutil.rmtree(tmp_path / "fork")
    result = subprocess.run(
        [sys.executable, "train.py", "--resume", tmp_path / "model" / "last"],
        cwd=fork(tmp_path, {"train.py": {OBJECTS: EMA}}),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 1
    assert "no ema.pt: the checkpoint was saved without 'ema'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "fused-adamw"])
def test_a_step_with_nonfinite_gradients_changes_nothing_whatever_the_optimizer(optimizer):
    weight = torch.nn.Parameter(torch.ones(3))
    make = {
        "sgd-momentum": lambda: torch.optim.SGD([weight], lr=0.1, momentum=0.9),
        "fused-adamw": lambda: torch.optim.AdamW([weight], lr=0.1, fused=True),
    }[optimizer]
    opt = make()
    weight.grad = torch.ones(3)
    assert runtime.step(opt, weight.grad.norm()) == 0
    before, state = (
        weight.detach().clone(),
        {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()},
    )
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    assert runtime.step(opt, weight.grad.norm()) == 1
    assert weight.equal(before)
    assert all(opt.state[k][n].equal(v) for k, s in state.items() for n, v in s.items())
    weight.grad = torch.ones(3)
    assert runtime.step(opt, weight.grad.norm()) == 0 and not weight.equal(
        before
    )  # then it goes on
