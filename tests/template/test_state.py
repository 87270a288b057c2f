"""State besides the weights: the `objects` saved and restored whole, and an EMA.

train.py's `objects` (optimizer, scheduler, fp16's loss scaler, an EMA of the weights, a second
optimizer) saved and restored whole, stepped by the loop, and an EMA that validation runs and best/
is chosen by. A forker's object is added the way a fork would, through a function of train.py
(setup()), never by matching its lines.

    python -m pytest -q tests/template/test_state.py
"""

import os
import shutil
import subprocess
import sys

import torch
from torch.utils.data import DataLoader

from conftest import TREE, assert_bitwise_equal, data_args, epochs, read_json, read_log, run
from core import checkpoint, options, step

# fp16's loss scaler, as accelerate makes it on a GPU (it makes none on CPU): a real GradScaler,
# which doubles its scale after every step without an overflow (a resume that started it afresh
# ends at other weights, and at another scale). Added by wrapping train.setup(), as a fork can.
SCALED = """
import sys, torch, train
setup = train.setup
def scaled(args):
    accelerator, resumed, threads = setup(args)
    accelerator.scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**10, growth_factor=2.0, growth_interval=1
    )
    return accelerator, resumed, threads
train.setup = scaled
train.main()
"""


def train(*args, check=True, script=None):
    """`python train.py ARGS` in the template's copy (or SCRIPT there, a wrapper of train.py)."""
    if script:
        (TREE / "scaled_train.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "scaled_train.py" if script else "train.py", *map(str, args)],
        cwd=TREE,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def model_args(tiny_data, *more):
    return [*data_args(tiny_data), "--model_name_or_path", TREE / "assets" / "tiny-bert", *more]


def test_an_ema_and_a_loss_scaler_resume_bitwise(tiny_data, tmp_path):
    args = model_args(tiny_data, "--epochs", 1, "--batch_size", 16, "--ema_decay", 0.9)
    train(*args, "--outdir", tmp_path / "whole", script=SCALED)
    train(*args, "--outdir", tmp_path / "stopped", "--stop_after_steps", 9, script=SCALED)
    stopped = tmp_path / "stopped" / "last"
    saved = checkpoint.load_tensors(stopped / "scaler.pt")
    assert saved["scale"] == 2.0**19, saved  # 9 steps, none overflowed
    assert {"ema.pt", "scaler.pt"} <= set(read_json(stopped / "manifest.json")["files"])
    train("--resume", stopped, script=SCALED)

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


def test_a_checkpoint_without_an_object_that_the_run_now_has_is_refused_by_name(
    tiny_data, tmp_path
):
    args = model_args(tiny_data, "--epochs", 1)
    train(*args, "--outdir", tmp_path / "model", "--stop_after_steps", 2)
    last = tmp_path / "model" / "last"
    result = train("--resume", last, "--ema_decay", 0.9, check=False)
    assert result.returncode == 1 and "--ema_decay 0.9 differs from" in result.stderr
    result = train("--resume", last, "--ema_decay", 0.9, "--ignore_mismatch", check=False)
    assert result.returncode == 1
    assert "no ema.pt: the checkpoint was saved without 'ema'" in result.stderr
    assert "Traceback" not in result.stderr


def validation_loss(model, tiny_data, best):
    """The mean validation loss over examples, as train.py reports it, computed here."""
    import dataset

    args = options.parse_args(
        ["--resume", str(best), "--valid_file", str(tiny_data / "valid.jsonl")]
    )
    tokenizer = dataset.load_tokenizer(best, args)
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    valid = dataset.generate_dataset(args.valid_file, "validation", tokenizer, args, labels)
    total = 0.0
    with torch.no_grad():
        for batch in DataLoader(valid, args.batch_size, collate_fn=valid.collate):
            total += model(**batch).loss.item() * len(batch["labels"])
    return total / len(valid)


def test_an_ema_is_what_validation_runs_and_best_is_chosen_by(tiny_data, tmp_path):
    import modeling

    outdir = tmp_path / "model"
    run(*model_args(tiny_data, "--epochs", 3, "--ema_decay", 0.8), "--outdir", outdir)
    log, best = read_log(outdir / "log.json"), outdir / "best"
    reported = min(entry["valid_log"]["loss"] for entry in epochs(log).values())
    trained = modeling.Model.from_pretrained(best).eval()
    average = checkpoint.load_tensors(best / "ema.pt")
    assert int(average.pop("n_averaged")) == read_json(best / "trainer_state.json")["global_step"]
    ema = modeling.Model.from_pretrained(best).eval()
    ema.load_state_dict({k.removeprefix("module."): v for k, v in average.items()})
    assert abs(validation_loss(ema, tiny_data, best) - reported) < 1e-5
    assert abs(validation_loss(trained, tiny_data, best) - reported) > 1e-3  # not the model's

    result = subprocess.run(
        [sys.executable, "predict.py", "--checkpoint", best, "--input_file",
         tiny_data / "valid.jsonl", "--output_file", tmp_path / "predictions.jsonl"],
        cwd=TREE, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predicting with the EMA of the weights" in result.stderr
    shutil.rmtree(outdir)


def test_a_step_with_nonfinite_gradients_changes_nothing_in_any_optimizer_of_objects():
    """A second optimizer in train.py's `objects` skips a non-finite step as the first does: one
    that reads found_inf on the device (fused AdamW) and one asked by a read (SGD with momentum)."""
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    objects = {
        "optimizer": torch.optim.AdamW([first], lr=0.1, fused=True),
        "second": torch.optim.SGD([second], lr=0.1, momentum=0.9),
    }

    def step_with(value):
        first.grad, second.grad = torch.full((3,), value), torch.ones(2)
        norm = torch.cat([first.grad, second.grad]).norm()
        return step.optimizer_step(objects, norm)

    assert step_with(1.0) == 0
    weights = [first.detach().clone(), second.detach().clone()]
    states = {
        name: {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
        for name, opt in objects.items()
    }
    assert step_with(float("nan")) == 1
    assert first.equal(weights[0]) and second.equal(weights[1])
    for name, opt in objects.items():
        assert all(opt.state[k][n].equal(v) for k, s in states[name].items() for n, v in s.items())
    assert first.grad is None and second.grad is None  # zeroed, as after every step
    assert step_with(1.0) == 0
    assert not first.equal(weights[0]) and not second.equal(weights[1])  # then both go on
