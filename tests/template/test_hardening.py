"""Careless use and tampering: nothing lost, nothing run, nothing silent. Each case as a user or an
attacker would bring it about, with the one line the user then sees.

    pytest tests/template/test_hardening.py             # in this process
    pytest -m slow tests/template/test_hardening.py     # a real full disk with 2 processes, Ctrl-C under accelerate launch
"""

import json
import os
import pickle
import shutil
import signal
import subprocess

import pytest

import predict
import train
from conftest import assert_bitwise_equal, data_args, launch, read_json, run
from core import checkpoint

FAST = ["--batch_size", "32", "--epochs", "1"]


def refused(argv, *fragments, main=train.main):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def snapshot(folder):
    """Every file's bytes, but .lock: each run that takes the lock writes its pid and start time there."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def finished(tiny_data, tmp_path):
    """A finished 1-epoch run in tmp_path/model."""
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), *FAST, "--outdir", outdir)
    return outdir


def rewrite_manifest(folder):
    """What an attacker does after changing a file: the manifest is an integrity check, not a signature."""
    files = {
        p.name: checkpoint.sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"
    }
    checkpoint.write_json(folder / "manifest.json", {"global_step": 1, "files": files})


# ---------------------------------------------------------------- no code from a checkpoint or a model folder


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = None


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_checkpoint_that_asks_to_run_its_code_is_refused_without_a_prompt(
    file, finished, tmp_path, tiny_data
):
    global SENTINEL
    SENTINEL = tmp_path / "ran"
    folder = tmp_path / "doctored"
    shutil.copytree(finished / "last", folder)
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(SENTINEL)!r}).touch()\n")
    config = json.loads((folder / file).read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoTokenizer": ["evil.Tokenizer", None]}
    (folder / file).write_text(json.dumps(config))
    rewrite_manifest(folder)
    refused(
        [
            "--checkpoint",
            folder,
            "--input_file",
            tiny_data / "valid.jsonl",
            "--output_file",
            tmp_path / "p.jsonl",
        ],
        f"{file} asks to run code that came with the folder",
        main=predict.main,
    )
    refused(["--resume", folder, "--outdir", tmp_path / "out"], f"{file} asks to run code")
    refused(
        [*data_args(tiny_data), "--model_name_or_path", folder, "--outdir", tmp_path / "out2"],
        "asks to run code",
    )
    assert not SENTINEL.exists()


# ---------------------------------------------------------------- the outdir: nothing lost


def test_overwrite_deletes_nothing_until_the_new_run_has_saved(finished, tiny_data):
    before = snapshot(finished)
    # Refused before training, and a run that stops on NaN before its first save: the old run stays whole.
    refused(
        [
            *data_args(tiny_data),
            *FAST,
            "--outdir",
            finished,
            "--overwrite",
            "--metric_for_best",
            "acc",
        ],
        "--metric_for_best acc",
    )
    refused(
        [
            *data_args(tiny_data),
            *FAST,
            "--outdir",
            finished,
            "--overwrite",
            "--lr",
            "1e30",
            "--max_grad_norm",
            "0",
            "--log_every",
            "1",
        ],
        "non-finite gradients",
    )
    assert snapshot(finished) == before
    # A run that saves mid-epoch: its last/ replaces the old one, and the old best/ goes with it.
    run(
        *data_args(tiny_data),
        "--batch_size",
        32,
        "--epochs",
        2,
        "--outdir",
        finished,
        "--overwrite",
        "--stop_after_steps",
        3,
    )
    assert read_json(finished / "last" / "trainer_state.json")["global_step"] == 3
    assert not (finished / "best").exists() and read_json(finished / "log.json") == {}


def test_overwrite_never_deletes_what_the_template_did_not_write(tiny_data, tmp_path):
    outdir = tmp_path / "mine"
    (outdir / "best").mkdir(parents=True)
    (outdir / "best" / "weights.pt").write_bytes(b"my own")
    (outdir / "log.json").write_text('{"notes": "mine"}')
    before = snapshot(outdir)
    message = refused(
        [*data_args(tiny_data), *FAST, "--outdir", outdir, "--overwrite"],
        "holds best, log.json, which this template did not write",
        "never replaces",
    )
    assert "--overwrite" not in message and snapshot(outdir) == before


def test_resume_of_a_copied_checkpoint_writes_beside_it_and_never_into_another_run(
    finished, tiny_data, tmp_path
):
    original = snapshot(finished)
    copy = tmp_path / "copied" / "last"
    shutil.copytree(finished / "last", copy)
    run("--resume", copy, "--epochs", 2)
    assert snapshot(finished) == original  # the outdir recorded in my_config.json is not touched
    assert list(read_json(tmp_path / "copied" / "log.json")) == ["Epoch 0", "Epoch 1"]
    other = tmp_path / "other"
    run(*data_args(tiny_data), *FAST, "--outdir", other)
    refused(
        ["--resume", finished / "last", "--epochs", 2, "--outdir", other],
        f"--outdir {other} holds another run",
    )


# ---------------------------------------------------------------- options: checked before anything happens


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('overwrite: "false"\n', "overwrite: 'false' is not true or false"),
        ("epochs: 1.5\n", "epochs: 1.5 is not a number (int)"),
        ("lr_scheduler_type: linearr\n", "lr_scheduler_type: 'linearr' is not one of linear,"),
        ("epochs: [1\n", "not valid YAML (line 2:"),
        ("lr: .nan\n", "lr: nan is not a number >= 0"),
    ],
)
def test_a_config_file_is_held_to_what_the_command_line_takes(text, fragment, finished, tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text(text)
    before = snapshot(finished)
    refused(["--config", config, "--outdir", finished], str(config), fragment)
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max_grad_norm", "-1"),
        ("--save_steps", "-1"),
        ("--accumulation", "-2"),
        ("--num_warmup_steps", "-5"),
        ("--max_len", "0"),
        ("--epochs", "0"),
        ("--batch_size", "0"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--log_every", "0"),
        ("--early_stopping_patience", "-1"),
        ("--num_workers", "-1"),
    ],
)
def test_out_of_range_options_are_one_line(option, value, tmp_path):
    refused([option, value, "--outdir", tmp_path / "model"], f"argument {option}: {value} is not a")
    assert not (tmp_path / "model").exists()


def test_an_outdir_that_is_a_file_is_refused_before_anything(tmp_path):
    (tmp_path / "model").write_text("a file")
    refused(["--outdir", tmp_path / "model"], "is a file; give a folder")


def test_options_that_change_the_numbers_are_refused_or_said_on_resume(
    finished, tiny_data, tmp_path
):
    for option, value in [("--max_grad_norm", "0.5"), ("--mixed_precision", "bf16")]:
        refused(["--resume", finished / "last", option, value], f"{option} {value} differs from")
    other_valid = tmp_path / "valid.jsonl"
    other_valid.write_text(
        "\n".join((tiny_data / "valid.jsonl").read_text().splitlines()[:32]) + "\n"
    )
    err = run("--resume", finished / "last", "--epochs", 2, "--valid_file", other_valid).stderr
    assert (
        "changed on resume: " in err
        and "--epochs 1 -> 2" in err
        and f"--valid_file {tiny_data / 'valid.jsonl'} -> {other_valid}" in err
    )
    assert "changed on resume: the validation data" in err


# ---------------------------------------------------------------- data: nothing silent


def test_resume_on_changed_training_data_is_refused(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    outdir = tmp_path / "model"
    run(
        *data_args(data),
        "--batch_size",
        32,
        "--epochs",
        2,
        "--outdir",
        outdir,
        "--stop_after_steps",
        3,
    )
    lines = (data / "train.jsonl").read_text().splitlines()
    for changed in (lines[:-1], lines[1:] + lines[:1]):  # a row removed; the rows reordered
        (data / "train.jsonl").write_text("\n".join(changed) + "\n")
        refused(
            ["--resume", outdir / "last"],
            "the training data changed since the checkpoint was saved",
            str(data / "train.jsonl"),
            "--ignore_mismatch",
        )
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")  # back as it was: resumes
    run("--resume", outdir / "last")
    recorded = read_json(outdir / "last" / "trainer_state.json")["data"]["train"]
    assert recorded["rows"] == 320 and recorded["sha256"] == checkpoint.sha256(data / "train.jsonl")


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (
            '{"text": "good", "label": NaN}\n{"text": "bad", "label": 1.0}\n',
            "line 1: the 'label' field is nan, not a class",
        ),
        (
            '{"text": "good", "label": 1}\n{"text": "bad", "label": "1"}\n',
            "the 'label' column mixes numbers and strings",
        ),
        (
            b'{"text": "good", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n',
            "line 2: not UTF-8 text",
        ),
    ],
)
def test_bad_labels_and_bytes_are_one_line(rows, fragment, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
    refused(["--train_file", path, "--outdir", tmp_path / "model"], str(path), fragment)


def test_max_len_beyond_the_models_positions_is_refused_before_training(tmp_path):
    long_text = " ".join(["the food was great"] * 60)  # ~240 tokens; tiny-bert has 128 positions
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(
        json.dumps({"text": long_text, "label": "positive"})
        + "\n"
        + json.dumps({"text": "awful", "label": "negative"})
        + "\n"
    )
    refused(
        [
            "--train_file",
            train_file,
            "--valid_file",
            train_file,
            "--max_len",
            512,
            "--outdir",
            tmp_path / "model",
        ],
        "--max_len 512: the model of assets/tiny-bert has 128 positions",
        "Pass --max_len 128 or less",
    )
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------- damaged checkpoints: named in one line


def damage_json(text):
    return lambda path: path.write_text(text)


@pytest.mark.parametrize(
    "name, damage, fragment",
    [
        ("manifest.json", damage_json("{not json"), "manifest.json is damaged"),
        (
            "manifest.json",
            damage_json('{"files": ["model.safetensors"]}'),
            "manifest.json is damaged",
        ),
        (
            "trainer_state.json",
            damage_json("{not json"),
            "trainer_state.json: not a trainer_state.json",
        ),
        (
            "trainer_state.json",
            damage_json('{"epoch": "one"}'),
            "trainer_state.json: epoch is 'one'",
        ),
        (
            "trainer_state.json",
            damage_json('{"epoch": 1, "planted": true}'),
            "trainer_state.json: not a trainer_state.json",
        ),
        ("my_config.json", damage_json("{not json"), "my_config.json: not valid JSON"),
        (
            "my_config.json",
            damage_json('{"epochs": "five"}'),
            "my_config.json: epochs: 'five' is not a number",
        ),
        ("my_config.json", damage_json('{"planted": 1}'), "unknown option 'planted'"),
    ],
)
def test_resume_names_the_damaged_file(name, damage, fragment, finished, tmp_path):
    folder = tmp_path / "last"
    shutil.copytree(finished / "last", folder)
    damage(folder / name)
    if name != "manifest.json":
        rewrite_manifest(folder)
    refused(["--resume", folder, "--outdir", tmp_path / "out"], fragment)


def test_a_pickle_in_optimizer_pt_is_refused_without_advice_to_run_it(finished, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "ran"
    folder = tmp_path / "last"
    shutil.copytree(finished / "last", folder)
    (folder / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    rewrite_manifest(folder)
    message = refused(
        ["--resume", folder, "--outdir", tmp_path / "out", "--epochs", 3],
        "optimizer.pt: refused to load",
        "could run code",
    )
    assert "weights_only=False" not in message and not SENTINEL.exists()


@pytest.mark.parametrize("how", ["truncated", "forged", "pickle instead"])
def test_predict_names_a_damaged_checkpoint(how, finished, tiny_data, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "ran"
    folder = tmp_path / "best"
    shutil.copytree(finished / "best", folder)
    weights = folder / "model.safetensors"
    if how == "truncated":  # the manifest catches it
        weights.write_bytes(weights.read_bytes()[:1000])
        fragment = "model.safetensors is missing, truncated or changed"
    else:  # and with the manifest rewritten, safetensors' own check
        if how == "forged":
            weights.write_bytes(b"\xff" * 64)
        else:
            weights.unlink()
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
        rewrite_manifest(folder)
        # forged: safetensors' own check; a pickle instead: the manifest must list the weights
        fragment = (
            "model.safetensors is damaged or missing"
            if how == "forged"
            else "does not list model.safetensors"
        )
    refused(
        [
            "--checkpoint",
            folder,
            "--input_file",
            tiny_data / "valid.jsonl",
            "--output_file",
            tmp_path / "p.jsonl",
        ],
        fragment,
        main=predict.main,
    )
    assert not SENTINEL.exists() and not (tmp_path / "p.jsonl").exists()


# ---------------------------------------------------------------- predict.py writes over nothing of value


def test_predict_never_writes_over_its_input_a_checkpoint_or_an_existing_file(
    finished, tiny_data, tmp_path
):
    data = tmp_path / "valid.jsonl"
    shutil.copy(tiny_data / "valid.jsonl", data)
    base = ["--checkpoint", finished / "best", "--input_file", data]
    refused([*base, "--output_file", data], "is the input file", main=predict.main)
    refused(
        [*base, "--output_file", finished / "best" / "config.json", "--overwrite"],
        "inside the checkpoint",
        main=predict.main,
    )
    existing = tmp_path / "notes.jsonl"
    existing.write_text("mine\n")
    refused([*base, "--output_file", existing], "exists; add --overwrite", main=predict.main)
    assert (
        existing.read_text() == "mine\n"
        and data.read_bytes() == (tiny_data / "valid.jsonl").read_bytes()
    )
    predict.main([str(a) for a in [*base, "--output_file", existing, "--overwrite"]])
    assert len(existing.read_text().splitlines()) == 64


# ---------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MiB tmpfs: room for one checkpoint of the tiny model (~1.3 MiB), not for a second."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_message_and_the_previous_checkpoint_stays(
    small_disk, tiny_data, tmp_path
):
    outdir = small_disk / "model"
    result = run(
        *data_args(tiny_data),
        "--batch_size",
        32,
        "--epochs",
        2,
        "--save_steps",
        3,
        "--outdir",
        outdir,
        check=False,
    )
    message = result.stderr[result.stderr.find("error: could not write") :].strip()
    assert result.returncode == 1 and message.startswith(
        "error: could not write a checkpoint into"
    ), result.stderr[-2000:]
    assert "\n" not in message
    assert "No space left on device" in message or "space" in message
    assert "are intact: free some space" in message
    checkpoint.verify(
        outdir / "last", recover=False
    )  # every file of the previous checkpoint matches its manifest
    assert read_json(outdir / "last" / "trainer_state.json")["global_step"] == 3
    assert not (
        outdir / ".staging"
    ).exists()  # the half-written one is gone (and its space with it)
    run("--resume", outdir / "last", "--outdir", tmp_path / "bigger")  # resumes, elsewhere
    assert read_json(tmp_path / "bigger" / "last" / "trainer_state.json")["epoch"] == 2


@pytest.mark.slow
def test_a_full_disk_with_two_processes_is_one_message_on_each(small_disk, tiny_data):
    outdir = small_disk / "model"
    result = launch(
        *data_args(tiny_data),
        "--batch_size",
        16,
        "--epochs",
        2,
        "--save_steps",
        3,
        "--outdir",
        outdir,
        processes=2,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.count("error: could not write a checkpoint into") == 2, result.stderr[
        -3000:
    ]
    checkpoint.verify(outdir / "last", recover=False)


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_a_second_one_stops_at_once(tiny_data, reference, tmp_path):
    from test_faults import start, wait_for_checkpoint

    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, 1, "--save_steps", 3, "--log_every", 1)
    wait_for_checkpoint(outdir, 3, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends to the whole foreground job
    output, _ = process.communicate(timeout=120)
    assert (
        f"Stopped by signal {int(signal.SIGINT)}" in output
        and "Continue with: accelerate launch" in output
    )
    assert (
        'train.py", line' not in output
    )  # no traceback of ours (the launcher prints its own on SIGINT)
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")

    again = tmp_path / "again"
    process = start(tiny_data, again, 1, "--save_steps", 1, "--log_every", 1)
    wait_for_checkpoint(again, 2, process)
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    checkpoint.verify(checkpoint.find(again / "last"), recover=False)  # the last whole checkpoint
    assert not list(again.glob(".staging*"))
    launch("--resume", again / "last")
    assert read_json(again / "last" / "trainer_state.json")["epoch"] == 2


def test_a_run_that_died_between_the_two_renames_resumes_from_old_last(finished, tmp_path):
    """What a crash between `last -> .old-last` and `.staging -> last` leaves: .old-last is taken back."""
    (finished / "last").rename(finished / ".old-last")
    run("--resume", finished / "last", "--epochs", 2)
    assert (
        read_json(finished / "last" / "trainer_state.json")["epoch"] == 2
        and not (finished / ".old-last").exists()
    )
