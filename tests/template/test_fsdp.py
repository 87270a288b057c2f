"""FSDP2, sharded for real on 2 CPU processes over gloo (configs/accelerate/fsdp_cpu.yaml).

Training, clipping and non-finite detection on the sharded gradients, full weights in best/ and
last/, exact resume, a kill inside a save, and resuming on another number of processes or without
sharding.

    python -m pytest -q -m slow tests/template/test_fsdp.py
"""

import pytest
import torch
from test_resume import recorded

from conftest import (
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    common_args,
    data_args,
    epochs,
    launch,
    read_json,
    read_log,
    weights,
)
from modeling import Model

pytestmark = pytest.mark.slow
CONFIG = "fsdp_cpu.yaml"


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory):
    """The uninterrupted FSDP2 run: 2 epochs, a checkpoint every 7 steps."""
    outdir = tmp_path_factory.mktemp("fsdp") / "whole"
    launch(
        *common_args(tiny_data, 2),
        "--outdir",
        outdir,
        config=CONFIG,
        script="tests/record.py",
        env={"RECORD": str(outdir.parent / "whole")},
    )
    return outdir


def test_it_is_sharded_and_saves_whole_weights(whole):
    state = read_json(whole / "last" / "trainer_state.json")
    assert (state["distributed_type"], state["num_processes"], state["global_step"]) == (
        "FSDP",
        2,
        2 * STEPS_PER_EPOCH,
    )
    for name in ("best", "last"):
        model = Model.from_pretrained(whole / name)  # whole weights, gathered at save
        assert model.head.weight.shape == (3, 64)
    # The optimizer state is saved sharded, each process its rows of each tensor, keyed by name.
    shards = [
        torch.load(whole / "last" / f"optimizer_{rank}.pt", weights_only=True) for rank in (0, 1)
    ]
    assert not (whole / "last" / "optimizer.pt").exists()
    moments = [shard["state"]["head.weight"]["exp_avg"] for shard in shards]
    assert [m.shape for m in moments] == [(2, 64), (1, 64)]  # 3 rows over 2 processes
    assert all(
        all(key.startswith(("encoder.", "head.")) for key in shard["state"]) for shard in shards
    )


def test_stopped_at_a_save_steps_checkpoint_and_resumed_is_bitwise(whole, tiny_data, tmp_path):
    outdir = tmp_path / "model"
    launch(
        *common_args(tiny_data, 2),
        "--outdir",
        outdir,
        "--stop_after_steps",
        STEPS_PER_EPOCH + 7,
        config=CONFIG,
    )
    launch("--resume", outdir / "last", config=CONFIG)
    assert_bitwise_equal(whole / "last", outdir / "last")
    assert_bitwise_equal(whole / "best", outdir / "best")
    assert read_log(outdir / "log.json") == read_log(whole / "log.json")


def test_killed_inside_a_save_then_resumed_is_bitwise(whole, tiny_data, tmp_path):
    outdir = tmp_path / "model"
    crashed = launch(
        "trainer_state.json",
        2,
        *common_args(tiny_data, 2),
        "--outdir",
        outdir,
        config=CONFIG,
        script="tests/crash.py",
        check=False,
    )
    assert (
        crashed.returncode != 0 and read_json(outdir / "last" / "manifest.json")["global_step"] == 7
    )
    launch("--resume", outdir / "last", config=CONFIG)
    assert_bitwise_equal(whole / "last", outdir / "last")


def test_a_tiny_max_grad_norm_clips_the_sharded_gradients(tiny_data, tmp_path):
    args = [*data_args(tiny_data), "--batch_size", 16, "--epochs", 1]
    launch(*args, "--outdir", tmp_path / "off", "--max_grad_norm", 0, config=CONFIG)
    launch(*args, "--outdir", tmp_path / "clipped", "--max_grad_norm", 1e-6, config=CONFIG)
    off, clipped = (weights(tmp_path / run / "last")["head.weight"] for run in ("off", "clipped"))
    assert not torch.equal(
        off, clipped
    )  # before: the clipped parameters were the unsharded originals


def test_non_finite_gradients_are_caught_on_the_sharded_parameters(tiny_data, tmp_path):
    result = launch(
        *data_args(tiny_data),
        "--batch_size",
        16,
        "--lr",
        "1e30",
        "--max_grad_norm",
        0,
        "--log_every",
        1,
        "--outdir",
        tmp_path / "model",
        config=CONFIG,
        check=False,
    )
    assert (
        result.returncode != 0
        and "non-finite gradients in 1 of the optimizer steps up to step 2" in result.stderr
    )
    assert not (tmp_path / "model" / "last").exists()


def test_an_fsdp2_checkpoint_resumes_on_one_process_without_sharding(whole, tiny_data, tmp_path):
    outdir = tmp_path / "model"
    launch(*common_args(tiny_data, 2), "--outdir", outdir, "--stop_after_steps", 13, config=CONFIG)
    result = launch(
        "--resume",
        outdir / "last",
        processes=1,
        script="tests/record.py",
        env={"RECORD": str(tmp_path / "resumed")},
    )
    assert "resuming on 1 process(es) instead of 2: --accumulation 1 -> 2" in result.stderr
    # From the stop on, each optimizer step takes the examples the uninterrupted FSDP2 run's step
    # took.
    assert recorded(tmp_path / "resumed", 1) == recorded(whole.parent / "whole", 2)[13:]
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["distributed_type"], state["global_step"]) == ("NO", 2 * STEPS_PER_EPOCH)
    wa, wb = weights(outdir / "last"), weights(whole / "last")
    difference = (
        (sum((wa[k] - wb[k]).pow(2).sum() for k in wa) / sum(wb[k].pow(2).sum() for k in wb))
        .sqrt()
        .item()
    )
    print(
        "relative weight difference, FSDP2 2 processes -> 1 process vs uninterrupted FSDP2: "
        f"{difference:.2e}"
    )
    assert difference < 0.2


def test_a_one_process_checkpoint_resumes_sharded_on_two(whole, tiny_data, tmp_path):
    """One checkpoint format (whole weights, the whole optimizer state by parameter name): 1 process
    x accumulation 2 resumes as FSDP2 on 2 processes x 1, taking the same examples per step."""
    outdir = tmp_path / "model"
    launch(
        *data_args(tiny_data),
        "--epochs",
        2,
        "--num_warmup_steps",
        5,
        "--save_steps",
        7,
        "--batch_size",
        8,
        "--accumulation",
        2,
        "--outdir",
        outdir,
        "--stop_after_steps",
        13,
    )
    assert read_json(outdir / "last" / "trainer_state.json")["distributed_type"] == "NO"
    launch(
        "--resume",
        outdir / "last",
        config=CONFIG,
        script="tests/record.py",
        env={"RECORD": str(tmp_path / "resumed")},
    )
    assert recorded(tmp_path / "resumed", 2) == recorded(whole.parent / "whole", 2)[13:]
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["distributed_type"], state["global_step"]) == ("FSDP", 2 * STEPS_PER_EPOCH)
    log, expected = read_log(outdir / "log.json"), read_log(whole / "log.json")
    assert [e["train_log"]["lr"] for e in epochs(log).values()] == [
        e["train_log"]["lr"] for e in epochs(expected).values()
    ]


def test_a_missing_shard_is_refused_by_name(whole, tmp_path):
    import shutil

    from core import checkpoint

    folder = tmp_path / "last"
    shutil.copytree(whole / "last", folder)
    (folder / "optimizer_1.pt").unlink()
    files = {
        p.name: checkpoint.sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"
    }
    checkpoint.write_json(
        folder / "manifest.json", {"global_step": 40, "files": files}
    )  # rewritten to match
    result = launch(
        "--resume", folder, "--epochs", 3, "--outdir", tmp_path / "out", config=CONFIG, check=False
    )
    assert (
        result.returncode != 0
        and f"{folder / 'optimizer_1.pt'} is missing: the optimizer state is incomplete"
        in result.stderr
    )


def test_an_ema_of_the_sharded_weights_is_refused_before_step_1(tiny_data, tmp_path):
    """The main process saves every object but the optimizers: an EMA of sharded weights would
    be saved in part, so it is refused in one line."""
    args = [*data_args(tiny_data), "--batch_size", 16, "--ema_decay", 0.9]
    result = launch(*args, "--outdir", tmp_path / "model", config=CONFIG, check=False)
    assert result.returncode != 0
    assert "error: 'ema' (--ema_decay) holds weights sharded by FSDP2" in result.stderr
    # One line from train.py (torchrun's agent then prints a traceback of its own, about the
    # workers that exited 1).
    assert "UserError" not in result.stderr and "in objects_under_fsdp" not in result.stderr
    assert not (tmp_path / "model" / "last").exists()
