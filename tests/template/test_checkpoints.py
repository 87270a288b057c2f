"""Checkpoints on disk: written whole, checked against their manifest, bad files refused by name.

A kill inside a save or between its two renames, a link among the checkpoints and a full disk leave
a whole checkpoint to resume from; a damaged file is named in one line; a pickle or a config's
auto_map never runs.

    python -m pytest -q tests/template/test_checkpoints.py
    python -m pytest -q -m slow tests/template/test_checkpoints.py    # kills, 2 processes
"""

import errno
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys

import pytest

import predict
import train
from conftest import (
    TREE,
    assert_bitwise_equal,
    common_args,
    data_args,
    launch,
    read_json,
    read_log,
    refused,
    run,
    snapshot,
)
from core import checkpoint

# ----------------------------------------- written whole: killed inside a save, between its renames


# Moments of the 2nd save (step 14; the 1st is at step 7) where tests/crash.py kills the process:
# right after the N-th rename onto NAME.
CRASHES = {
    ("trainer_state.json", 2): "inside a save, optimizer.pt written, manifest not yet",
    (".old-last", 1): "between the two renames: last/ moved away, the new one not yet in place",
    ("last", 2): "right after the new last/ is in place, before the old one is removed",
    ("log.json", 2): "right after a complete save, before the next step",
}


@pytest.mark.slow
@pytest.mark.parametrize("name, count", CRASHES, ids=[f"{name}-{count}" for name, count in CRASHES])
def test_killed_during_or_after_a_save_then_resumed_is_bitwise_the_uninterrupted_run(
    name, count, tiny_data, reference, tmp_path
):
    outdir = tmp_path / "model"
    crashed = launch(
        name,
        count,
        *common_args(tiny_data, 1),
        "--outdir",
        outdir,
        script="tests/crash.py",
        check=False,
    )
    assert crashed.returncode != 0, "the fault was not injected"
    assert not (outdir / "last").exists() or read_json(outdir / "last" / "manifest.json")[
        "global_step"
    ] in (7, 14)
    launch("--resume", outdir / "last")
    assert_bitwise_equal(reference(1) / "last", outdir / "last")
    assert read_log(outdir / "log.json") == read_log(reference(1) / "log.json")


def test_a_run_that_died_between_the_two_renames_resumes_from_old_last(finished, tmp_path):
    """What a crash between `last -> .old-last` and `.staging -> last` leaves: .old-last is taken
    back."""
    (finished / "last").rename(finished / ".old-last")
    run("--resume", finished / "last", "--epochs", 2)
    assert (
        read_json(finished / "last" / "trainer_state.json")["epoch"] == 2
        and not (finished / ".old-last").exists()
    )


# ---------------------------------------------------------------- links among the checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("silent") / "other"
    run(*data_args(tiny_data), "--epochs", 1, "--batch_size", 32, "--outdir", outdir)
    return outdir


def test_a_checkpoint_that_is_a_link_is_refused(finished_run, tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "last").symlink_to(finished_run / "last")  # another run's last/, linked in
    refused(["--resume", mine / "last"], f"--resume {mine / 'last'} is a symbolic link")
    refused([*data_args(tiny_data), "--outdir", mine, "--overwrite"], "last is a symbolic link")
    assert (finished_run / "last" / "manifest.json").is_file() and (mine / "last").is_symlink()


def test_a_link_moved_aside_is_removed_and_the_next_save_goes_through(finished_run, tmp_path):
    """publish() moves the old checkpoint to .old-NAME and removes it; a link there (rmtree leaves a
    link alone) is unlinked, what it points to kept, and the save after it is not blocked."""
    outdir = tmp_path / "model"
    outdir.mkdir()
    (outdir / ".old-last").symlink_to(finished_run / "last")
    for step in range(2):
        staging = outdir / ".staging"
        staging.mkdir()
        (staging / "step").write_text(str(step))
        checkpoint.publish(staging, outdir / "last")
        assert (outdir / "last" / "step").read_text() == str(step) and not os.path.lexists(
            outdir / ".old-last"
        )
    assert (finished_run / "last" / "manifest.json").is_file()


def test_a_checkpoint_without_its_weights_is_never_published(finished_run, tmp_path, capsys):
    """What a process that wrongly took itself for the main one wrote (save_pretrained wrote nothing
    there): publish_all() refuses it, and last/ stays the previous checkpoint."""
    outdir = tmp_path / "model"
    shutil.copytree(finished_run, outdir)
    before = snapshot(outdir)
    staging = outdir / ".staging"
    shutil.copytree(outdir / "last", staging)
    for name in ("model.safetensors", "config.json", "manifest.json"):
        (staging / name).unlink()
    state = checkpoint.read_state(staging)
    with pytest.raises(SystemExit) as refused_save:
        checkpoint.publish_all(outdir, staging, ["last"], state)
    assert str(refused_save.value.code) == (
        f"error: could not save a checkpoint into {outdir}: config.json, model.safetensors were "
        f"not written, so nothing was published (the previous checkpoints are intact). Was the "
        f"model saved from the main process? Check how the processes were launched."
    )
    shutil.rmtree(staging)
    assert snapshot(outdir) == before


@pytest.mark.skipif(not shutil.which("chattr"), reason="needs chattr (e2fsprogs)")
def test_an_old_checkpoint_that_cannot_be_removed_is_set_aside_and_the_saves_go_on(
    finished_run, tmp_path
):
    """NFS keeps a file another process holds open (as .nfsXXXX) until it is closed, so .old-best
    cannot be removed and the next rename onto it failed with "[Errno 39] Directory not empty". Made
    here with a file that cannot be unlinked (chattr +i): the save goes through, the old folder is
    set aside in one line, and a later save removes it once it can."""
    outdir = tmp_path / "model"
    shutil.copytree(finished_run, outdir)
    stuck = outdir / ".old-best"
    stuck.mkdir()
    held = stuck / ".nfs0000000000001234"
    held.write_bytes(b"held open")
    immutable = subprocess.run(["chattr", "+i", held], capture_output=True)
    if immutable.returncode:
        pytest.skip(f"chattr +i not allowed here: {immutable.stderr.decode().strip()}")
    try:
        result = run("--resume", outdir / "last", "--epochs", 3, "--save_steps", 4)
    finally:
        for held in outdir.glob(".old-best*/.nfs*"):
            subprocess.run(["chattr", "-i", held], check=True)
    asides = [p.name for p in outdir.iterdir() if p.name.startswith(".old-best.")]
    assert len(asides) == 1 and not stuck.exists(), sorted(p.name for p in outdir.iterdir())
    said = [line for line in result.stderr.splitlines() if "could not be removed" in line]
    assert said == [
        f"{outdir / asides[0]}: could not be removed (.nfs0000000000001234 left in it, held "
        f"open?); set aside, a later save removes it."
    ]
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 3
    assert checkpoint.verify(outdir / "best") is None and checkpoint.verify(outdir / "last") is None
    run("--resume", outdir / "last", "--epochs", 4)  # the file can go now: the next save removes it
    assert not [p.name for p in outdir.iterdir() if p.name.startswith(".old-")]


# ---------------------------------------------------------------- a full disk


def test_disk_full_during_a_save_leaves_the_previous_checkpoint_intact(
    tiny_data, tmp_path, monkeypatch
):
    outdir = tmp_path / "model"
    real_save, calls = checkpoint.torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if (
            len(calls) == 3
        ):  # the 2nd checkpoint's optimizer.pt (each checkpoint writes 2 files this way)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(
        SystemExit, match="could not write a checkpoint .*No space left on device.* are intact"
    ):
        train.main(
            [
                *map(str, data_args(tiny_data)),
                "--outdir",
                str(outdir),
                "--save_steps",
                "3",
                "--batch_size",
                "32",
            ]
        )
    assert read_json(outdir / "last" / "manifest.json")["global_step"] == 3
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    checkpoint.verify(outdir / "last")  # every file matches the manifest
    train.main(["--resume", str(outdir / "last")])
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 5


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


# ---------------------------------------------------------------- a damaged file, named in one line


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", corrupt),
        ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("rng_state_0.safetensors", lambda p: p.unlink()),
    ],
)
def test_a_damaged_checkpoint_file_is_refused_by_name(name, damage, reference, tmp_path):
    folder = tmp_path / "last"
    shutil.copytree(reference(1) / "last", folder)
    damage(folder / name)
    with pytest.raises(SystemExit, match=f"{name} is missing, truncated or changed"):
        checkpoint.verify(folder)


def rewrite_manifest(folder):
    """What an attacker does after changing a file: the manifest is an integrity check, not a
    signature."""
    files = {
        p.name: checkpoint.sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"
    }
    checkpoint.write_json(folder / "manifest.json", {"global_step": 1, "files": files})


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


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = None


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


# ----------------------------------------------------- no code from a checkpoint: pickles, auto_map


def test_a_malicious_lr_bin_is_refused_and_never_runs(reference, tmp_path):
    global SENTINEL
    SENTINEL = tmp_path / "pwned"
    folder = tmp_path / "last"
    shutil.copytree(reference(1) / "last", folder)
    (folder / "lr.bin").write_bytes(pickle.dumps(Payload()))
    manifest = read_json(
        folder / "manifest.json"
    )  # as an attacker would: the manifest is no signature
    manifest["files"]["lr.bin"] = checkpoint.sha256(folder / "lr.bin")
    checkpoint.write_json(folder / "manifest.json", manifest)
    with pytest.raises(SystemExit, match="lr.bin: refused to load"):
        train.main(["--resume", str(folder), "--outdir", str(tmp_path / "out"), "--epochs", "3"])
    assert not SENTINEL.exists()


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


def test_a_save_touches_none_of_the_outdirs_other_entries(tiny_data, tmp_path):
    """A named pipe in --outdir (opening it would wait for a writer for ever) and a dangling link
    (opening it fails) beside the checkpoints: the run saves and ends, and leaves them alone."""
    outdir = tmp_path / "model"
    outdir.mkdir()
    os.mkfifo(outdir / "pipe")
    (outdir / "gone").symlink_to(tmp_path / "nothing")
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, data_args(tiny_data)), "--batch_size", "16",
         "--epochs", "1", "--save_steps", "5", "--outdir", str(outdir)],
        cwd=TREE, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(outdir / "last" / "manifest.json")["global_step"] == 20
    assert stat.S_ISFIFO(os.lstat(outdir / "pipe").st_mode) and (outdir / "gone").is_symlink()
