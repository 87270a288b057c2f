"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes over gloo (DS_ACCELERATOR=cpu and
configs/accelerate/deepspeed_zero*_cpu.yaml): training within float error of DDP, whole weights in
best/ and last/, DeepSpeed's own optimizer files covered by the manifest and read only once they
load as plain tensors, exact resume after a SIGTERM mid-epoch and after a kill -9, and the launches
that would run something else refused in one line.

    python -m pytest -q -m slow tests/template/test_deepspeed.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_examples import copy_repository

from conftest import (
    ROOT,
    STEPS_PER_EPOCH,
    assert_bitwise_equal,
    common_args,
    data_args,
    home,
    launch,
    read_json,
    read_log,
    weights,
)
from modeling import Model
from utils import sha256

pytest.importorskip("deepspeed")
CONFIGS = {2: "deepspeed_zero2_cpu.yaml", 3: "deepspeed_zero3_cpu.yaml"}


@pytest.fixture(scope="module")
def ddp(tiny_data, tmp_path_factory):
    """The same run as DDP on 2 CPU processes."""
    outdir = tmp_path_factory.mktemp("ddp") / "model"
    launch(*common_args(tiny_data, 2), "--outdir", outdir, processes=2)
    return outdir


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def whole(request, tiny_data, tmp_path_factory):
    """The uninterrupted run under ZeRO-2 or ZeRO-3: 2 epochs, a checkpoint every 7 steps."""
    outdir = tmp_path_factory.mktemp(f"zero{request.param}") / "model"
    launch(*common_args(tiny_data, 2), "--outdir", outdir, config=CONFIGS[request.param])
    return request.param, outdir


@pytest.mark.slow
def test_it_runs_under_deepspeed_within_float_error_of_ddp(whole, ddp):
    stage, outdir = whole
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (state["distributed_type"], state["num_processes"], state["global_step"]) == (
        "DEEPSPEED",
        2,
        2 * STEPS_PER_EPOCH,
    )
    # The same update, however DeepSpeed partitions it: the losses and the weights of DDP's run
    for name in ("best", "last"):
        mine, theirs = weights(outdir / name), weights(ddp / name)
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-5)
    ours, reference = read_log(outdir / "log.json"), read_log(ddp / "log.json")
    assert ours.keys() == reference.keys()
    for key in ours:
        for part in ("train_log", "valid_log"):
            for metric in ("loss", "lr"):
                if metric in ours[key].get(part, {}):
                    assert ours[key][part][metric] == pytest.approx(
                        reference[key][part][metric], rel=1e-5, abs=1e-9
                    )


@pytest.mark.slow
def test_checkpoints_hold_whole_weights_and_every_file_is_in_the_manifest(
    whole, tiny_data, tmp_path
):
    stage, outdir = whole
    for name in ("best", "last"):
        model = Model.from_pretrained(outdir / name)  # ZeRO-3's weights gathered at save
        assert model.head.weight.shape == (3, 64)
        folder = outdir / name
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        listed = set(read_json(folder / "manifest.json")["files"])
        assert on_disk - {"manifest.json"} == listed
        # DeepSpeed's partitions of the optimizer state, one file a process; no script of its own
        optimizer_files = {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
        assert optimizer_files <= listed and not any(n.endswith(".py") for n in on_disk)
        assert "optimizer.pt" not in listed
    output = tmp_path / "predictions.jsonl"
    subprocess.run(
        [sys.executable, "predict.py", "--checkpoint", outdir / "best", "--input_file"]
        + [tiny_data / "valid.jsonl", "--output_file", output],
        cwd=home(),
        capture_output=True,
        check=True,
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == len((tiny_data / "valid.jsonl").read_text().splitlines())
    assert all(line["label"] in ("negative", "neutral", "positive") for line in lines)


def interrupted(stage, tiny_data, tmp_path, signal_name, at):
    """The run of `whole` stopped by a real signal after optimizer step `at` (kill_once.py): SIGTERM
    to the process group (the run saves last/ and ends), or SIGKILL of process 1 (the run dies;
    last/ is the checkpoint of step 7 or 14)."""
    outdir = tmp_path / "model"
    result = launch(
        *common_args(tiny_data, 2),
        "--outdir",
        outdir,
        config=CONFIGS[stage],
        script="tests/kill_once.py",
        env={
            "KILL_ONCE": str(tmp_path / "killed"),
            "KILL_AT": str(at),
            "KILL_RANK": "0" if signal_name == "TERM" else "1",
            "KILL_SIGNAL": signal_name,
        },
        check=False,
    )
    assert result.returncode != 0 and (tmp_path / "killed").exists(), result.stdout[-2000:]
    return outdir, result


@pytest.mark.slow
def test_a_sigterm_mid_epoch_saves_and_the_resumed_run_is_bitwise(whole, tiny_data, tmp_path):
    stage, reference = whole
    outdir, result = interrupted(stage, tiny_data, tmp_path, "TERM", STEPS_PER_EPOCH + 3)
    assert "Stopped by signal 15" in result.stdout + result.stderr
    step = read_json(outdir / "last" / "trainer_state.json")["global_step"]
    assert STEPS_PER_EPOCH + 3 <= step < 2 * STEPS_PER_EPOCH  # inside the second epoch
    launch("--resume", outdir / "last", config=CONFIGS[stage])
    assert_bitwise_equal(reference / "last", outdir / "last")
    assert_bitwise_equal(reference / "best", outdir / "best")
    assert read_log(outdir / "log.json") == read_log(reference / "log.json")


@pytest.mark.slow
def test_a_kill_9_after_a_save_resumes_bitwise(whole, tiny_data, tmp_path):
    stage, reference = whole
    outdir, _ = interrupted(stage, tiny_data, tmp_path, "KILL", 10)
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == 7
    launch("--resume", outdir / "last", config=CONFIGS[stage])
    assert_bitwise_equal(reference / "last", outdir / "last")


@pytest.mark.slow
def test_non_finite_gradients_are_caught_under_zero3(tiny_data, tmp_path):
    """The engine skips a step whose gradients are not finite (its norm inf); train.py counts it
    and stops at the next log, as without DeepSpeed, before anything is saved."""
    result = launch(
        *data_args(tiny_data),
        *("--batch_size", 16, "--lr", "1e30", "--max_grad_norm", 0, "--log_every", 1),
        *("--outdir", tmp_path / "model"),
        config=CONFIGS[3],
        check=False,
    )
    assert result.returncode != 0
    assert "non-finite gradients in 1 of the optimizer steps up to step 2" in result.stderr
    assert not (tmp_path / "model" / "last").exists()


def workers(stderr):
    """What the training processes wrote: the launcher's own report of their exit ends it."""
    return stderr.split('Traceback (most recent call last):\n  File "<frozen runpy>"')[0]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


@pytest.mark.slow
def test_a_pickle_payload_in_a_deepspeed_file_is_refused_before_deepspeed_reads_it(
    whole, tmp_path, monkeypatch
):
    stage, reference = whole
    if stage != 2:
        pytest.skip("one stage is enough: the files are read the same way")
    checkpoint = tmp_path / "model" / "last"
    shutil.copytree(reference / "last", checkpoint)
    target = checkpoint / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    saved = torch.load(target, weights_only=False)  # the test's own file, to keep it realistic
    saved["payload"] = Payload()
    torch.save(saved, target)
    manifest = read_json(checkpoint / "manifest.json")  # rewritten to match, as an attacker would
    manifest["files"]["deepspeed/" + target.name] = sha256(target)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    result = launch("--resume", checkpoint, "--epochs", 3, config=CONFIGS[stage], check=False)
    assert result.returncode != 0 and not marker.exists()
    assert f"{target}: refused to load: it holds Python objects" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_deepspeed_checkpoint_resumed_otherwise_is_one_line(whole, tmp_path):
    """Without DeepSpeed, on 1 process, at the other ZeRO stage: one line each, nothing run."""
    stage, reference = whole
    result = launch("--resume", reference / "last", "--epochs", 3, processes=2, check=False)
    assert result.returncode == 1 and "saved under DeepSpeed" in result.stderr, result.stderr
    assert 'File "' not in workers(result.stderr)  # one line each, no worker's traceback
    one = subprocess.run(  # the same config on 1 process: the state is partitioned in 2
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        + [ROOT / "configs" / "accelerate" / CONFIGS[stage], "--num_processes", "1", "train.py"]
        + ["--resume", reference / "last", "--epochs", "3"],
        cwd=home(),
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 1 and "saved by 2 processes under DeepSpeed" in one.stderr
    assert 'File "' not in workers(one.stderr), one.stderr
    other = CONFIGS[5 - stage]  # ZeRO-2's checkpoint under ZeRO-3, and the other way round
    result = launch("--resume", reference / "last", "--epochs", 3, config=other, check=False)
    assert result.returncode == 1 and "DeepSpeed could not load its state" in result.stderr
    assert 'File "' not in workers(result.stderr), result.stderr


def test_a_deepspeed_config_with_accelerate_use_cpu_is_one_line_before_anything(
    tiny_data, tmp_path
):
    """With ACCELERATE_USE_CPU set, accelerate drops DeepSpeed and would run plain DDP, exit 0."""
    result = launch(
        *data_args(tiny_data),
        "--outdir",
        tmp_path / "model",
        config=CONFIGS[2],
        env={"ACCELERATE_USE_CPU": "1"},
        check=False,
    )
    assert result.returncode == 1 and "would drop DeepSpeed and run plain DDP" in result.stderr
    assert 'File "' not in workers(result.stderr), result.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["causal_lm", "token_classification", "seq2seq", "sft", "question_answering"]
)
def test_every_example_trains_under_zero3_as_under_ddp(name, tmp_path):
    """Each example's pair and train.yaml, 6 steps of 2 x --accumulation 2 batches, validation
    (generating, for those that generate: on every process) and samples every 3 steps, under ZeRO-3
    and under DDP: the same losses and metrics, token-weighted where modeling.py counts items."""
    repo = tmp_path / "repo"
    copy_repository(repo)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(repo / "examples" / name / user_file, repo / user_file)
    options = ["--config", f"examples/{name}/train.yaml", "--max_steps", 6, "--eval_steps", 3]
    options += ["--sample_every", 3, "--accumulation", 2, "--batch_size", 8]
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    zero3 = launch(*options, "--outdir", "zero3", cwd=repo, env=env, config=CONFIGS[3])
    launch(*options, "--outdir", "ddp", cwd=repo, env=env, processes=2)
    assert zero3.stdout.count("--- samples at step ") == 2, zero3.stdout[-2000:]
    assert read_json(repo / "zero3" / "last" / "trainer_state.json")["distributed_type"] == (
        "DEEPSPEED"
    )
    ours, reference = read_log(repo / "zero3" / "log.json"), read_log(repo / "ddp" / "log.json")
    assert ours.keys() == reference.keys() and {"Step 3", "Step 6"} <= ours.keys()
    for key in ours:
        assert ours[key].keys() == reference[key].keys()
        for part in ours[key]:
            numbers = {k: v for k, v in ours[key][part].items() if "per_second" not in k}
            expected = {k: reference[key][part][k] for k in numbers}
            assert numbers == pytest.approx(expected, rel=1e-3, abs=1e-6), (key, part)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bf16", "lora"])
def test_bf16_and_lora_under_zero3_resume_bitwise(variant, tiny_data, tmp_path):
    """--mixed_precision bf16 on CPU (the engine's bf16 weights in model.safetensors, its fp32
    master copy in the optimizer partitions) and --lora_r 4 (the base frozen, its weights and the
    adapters saved): stopped and resumed, bitwise the run never stopped."""
    options = [*data_args(tiny_data), "--batch_size", 8, "--max_steps", 12]
    options += ["--mixed_precision", "bf16"] if variant == "bf16" else ["--lora_r", 4]
    launch(*options, "--outdir", tmp_path / "whole", config=CONFIGS[3])
    stopped = tmp_path / "stopped"
    launch(*options, "--outdir", stopped, "--stop_after_steps", 5, config=CONFIGS[3])
    launch("--resume", stopped / "last", config=CONFIGS[3])
    assert_bitwise_equal(tmp_path / "whole" / "last", stopped / "last")
    files = read_json(stopped / "last" / "manifest.json")["files"]
    if variant == "bf16":
        assert {w.dtype for w in weights(stopped / "last").values()} == {torch.bfloat16}
        assert "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    else:
        adapters = load_file(stopped / "last" / "adapter_model.safetensors")
        trained = [k for k, v in adapters.items() if "lora_B" in k and v.abs().max() > 0]
        assert "adapter_model.safetensors" in files and trained  # lora_B starts at zero
