"""Nothing silent, round two: a data file rewritten under its old mtime, options files that include
others, links among the checkpoints, an outdir that cannot be written, fp16 on a CPU (and bf16,
which runs there), a data file that is not a regular file. Each through the real mechanism: a real
mtime restore, a real symlink, a real read-only bind mount (where root may make one), a real FIFO;
and a full disk under the datasets cache (a real small tmpfs).

    pytest tests/template/test_silent.py              # in this process
    pytest -m slow tests/template/test_silent.py      # bf16 on CPU, stopped and resumed (python train.py)
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import datasets
import pytest
from test_hardening import refused

import dataset
import train
from conftest import TREE, assert_bitwise_equal, data_args, launch, read_json, run, tiny_tokenizer
from core import checkpoint, options

# ---------------------------------------------------------------- 1. a file rewritten under its old mtime


def test_a_file_rewritten_with_its_old_size_and_mtime_is_read_again(tiny_data, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text((tiny_data / "train.jsonl").read_text())
    args = [
        "--train_file",
        train_file,
        "--valid_file",
        tiny_data / "valid.jsonl",
        "--epochs",
        1,
        "--batch_size",
        32,
    ]
    run(*args, "--outdir", tmp_path / "before")
    before = os.stat(train_file)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    swap = {
        "positive": "negative",
        "negative": "positive",
        "neutral": "neutral",
    }  # names of one length
    train_file.write_text(
        "".join(json.dumps({**row, "label": swap[row["label"]]}) + "\n" for row in rows)
    )
    os.utime(
        train_file, ns=(before.st_atime_ns, before.st_mtime_ns)
    )  # as rsync -t or a restore does
    assert (os.stat(train_file).st_size, os.stat(train_file).st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )

    rows_now = dataset.generate_dataset(
        train_file, "train", tiny_tokenizer(), options.parse_args([])
    )
    assert [rows_now.labels[rows_now[i]["labels"]] for i in range(len(rows))] == [
        swap[r["label"]] for r in rows
    ]
    run(*args, "--outdir", tmp_path / "after")  # trains on the new labels: other weights
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_bitwise_equal(tmp_path / "before" / "last", tmp_path / "after" / "last")
    digests = [
        read_json(tmp_path / name / "last" / "trainer_state.json")["data"]["train"]["sha256"]
        for name in ("before", "after")
    ]
    assert digests[0] != digests[1]


# ---------------------------------------------------------------- 2. options files that include others


def test_a_config_file_builds_on_the_one_it_names_and_a_loop_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 3\nbatch_size: 8\nlr: 0.002\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text("config: ../base.yaml\nbatch_size: 4\n")
    args = options.parse_args(
        ["--config", str(tmp_path / "configs" / "small.yaml"), "--lr", "0.001"]
    )
    assert (args.epochs, args.batch_size, args.lr) == (
        3,
        4,
        0.001,
    )  # base < the file < the command line

    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\nepochs: 2\n")
    refused(["--config", tmp_path / "a.yaml"], "a.yaml: includes itself", "b.yaml -> ")
    (tmp_path / "self.yaml").write_text("config: self.yaml\n")
    refused(["--config", tmp_path / "self.yaml"], "self.yaml: includes itself")
    (tmp_path / "lost.yaml").write_text("config: nowhere.yaml\n")
    refused(
        ["--config", tmp_path / "lost.yaml"],
        "lost.yaml: config: nowhere.yaml: no such options file",
    )
    (tmp_path / "typo.yaml").write_text("config: base.yaml\nepoch: 2\n")
    with pytest.raises(SystemExit):
        options.parse_args(["--config", str(tmp_path / "typo.yaml")])
    assert options.read_config(tmp_path / "typo.yaml")["epoch"] == (2, str(tmp_path / "typo.yaml"))
    assert options.read_config(tmp_path / "typo.yaml")["lr"] == (0.002, str(tmp_path / "base.yaml"))


# ---------------------------------------------------------------- 3. links among the checkpoints


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


# ---------------------------------------------------------------- 4. an outdir that cannot be written


def test_an_outdir_path_too_long_is_one_line_before_any_work(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("the data was read first"))
    refused(
        [*data_args(tiny_data), "--outdir", tmp_path / ("d" * 300)],
        "cannot write there (File name too long)",
    )
    deep = tmp_path.joinpath(*["d" * 200] * 25)  # each name fits, the path does not
    refused([*data_args(tiny_data), "--outdir", deep], "cannot write there")
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only bind mount of itself (root can make one; else the test is skipped)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = (
        subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    )
    if (
        mounted
        and subprocess.run(
            ["mount", "-o", "remount,ro,bind", folder, folder], capture_output=True
        ).returncode
    ):
        subprocess.run(["umount", folder])
        mounted = False
    if not mounted:
        pytest.skip("no read-only bind mount here (needs root)")
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_a_read_only_outdir_is_one_line_before_any_work(read_only, tiny_data, monkeypatch):
    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("the data was read first"))
    refused(
        [*data_args(tiny_data), "--outdir", read_only / "model"],
        "cannot write there (Read-only file system)",
    )
    refused(
        [*data_args(tiny_data), "--outdir", read_only], "cannot write there (Read-only file system)"
    )


# ---------------------------------------------------------------- 5. fp16 on a CPU; bf16


def python_train(*args, check=True):
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=TREE,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def test_fp16_on_a_cpu_is_refused_naming_bf16(tiny_data, tmp_path):
    result = python_train(
        *data_args(tiny_data), "--mixed_precision", "fp16", "--outdir", tmp_path / "m", check=False
    )
    assert result.returncode == 1 and not (tmp_path / "m").exists()
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --mixed_precision fp16 on a CPU: accelerate would run it in float32")
    ), result.stderr
    assert "--mixed_precision bf16" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bf16_on_a_cpu_trains_saves_and_resumes_bitwise(tiny_data, tmp_path):
    args = [*data_args(tiny_data), "--mixed_precision", "bf16", "--epochs", 1, "--batch_size", 16]
    python_train(*args, "--outdir", tmp_path / "whole")
    python_train(*args, "--outdir", tmp_path / "stopped", "--stop_after_steps", 9)
    python_train("--resume", tmp_path / "stopped" / "last")
    assert read_json(tmp_path / "whole" / "last" / "my_config.json")["mixed_precision"] == "bf16"
    assert_bitwise_equal(tmp_path / "whole" / "last", tmp_path / "stopped" / "last")
    assert read_json(tmp_path / "whole" / "log.json") == read_json(
        tmp_path / "stopped" / "log.json"
    )


# ---------------------------------------------------------------- 6. not a regular file


def test_a_data_file_that_is_a_fifo_or_a_folder_says_what_it_is(tiny_data, tmp_path):
    os.mkfifo(tmp_path / "train.jsonl")
    refused(
        [
            "--train_file",
            tmp_path / "train.jsonl",
            "--valid_file",
            tiny_data / "valid.jsonl",
            "--outdir",
            tmp_path / "m",
        ],
        "train.jsonl: a FIFO (named pipe), not a file of data",
    )
    (tmp_path / "valid.jsonl").mkdir()
    refused(
        [
            "--train_file",
            tiny_data / "train.jsonl",
            "--valid_file",
            tmp_path / "valid.jsonl",
            "--outdir",
            tmp_path / "m",
        ],
        "valid.jsonl: a folder, not a file of data",
    )


# ---------------------------------------------------------------- a full disk under the datasets cache


@pytest.fixture
def cache_disk(tmp_path, monkeypatch):
    """HF_DATASETS_CACHE on a real 1 MiB tmpfs (skipped where mount is not allowed)."""
    disk = tmp_path / "cache"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(disk))
    yield disk
    subprocess.run(["umount", "-l", disk], check=False)


def fill(disk):
    """Writes a file until the disk is full; returns it."""
    filler = disk / "filler"
    try:
        with open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    return filler


def test_a_full_datasets_cache_is_one_line_and_leaves_no_partial_file(
    cache_disk, tiny_data, tmp_path
):
    args = [*data_args(tiny_data), "--epochs", 1, "--batch_size", 32]
    run(
        *args, "--outdir", tmp_path / "first"
    )  # the rows and the vocabulary cached on the small disk
    shutil.rmtree(cache_disk / "vocabularies")
    for extra in ([], ["--max_len", 64]):  # the vocabulary to learn again; then new tokenized rows
        filler = fill(cache_disk)
        message = refused(
            [*args, *extra, "--outdir", tmp_path / "full"],
            "no space left on the device of "
            f"the datasets cache {cache_disk} while reading or tokenizing the data. Free space",
        )
        assert "I/O operation on closed file" not in message
        assert not [p for p in cache_disk.rglob("*") if p.name.startswith(("tmp", "."))], list(
            cache_disk.rglob("*")
        )
        filler.unlink()
        run(
            *args, *extra, "--outdir", tmp_path / f"after{len(extra)}"
        )  # with room: afresh, and it trains
        assert (tmp_path / f"after{len(extra)}" / "last" / "model.safetensors").is_file()


@pytest.mark.slow  # two runs at once
def test_two_first_runs_at_once_on_a_new_data_file_both_succeed(tiny_data, tmp_path):
    """Both read, cache and tokenize the same new file into one empty datasets cache at the same time
    (the second run used to die reading a cache file the first replaced)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):  # bytes no cache has seen: one more row each
        (data / name).write_text(
            (tiny_data / name).read_text() + (tiny_data / name).read_text().splitlines()[0] + "\n"
        )
    cache = tmp_path / "cache"

    def first_run(outdir):
        return launch(
            *data_args(data),
            "--epochs",
            1,
            "--outdir",
            outdir,
            check=False,
            env={"HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
        )

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(first_run, [tmp_path / "a", tmp_path / "b"]))
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert_bitwise_equal(
        tmp_path / "a" / "last", tmp_path / "b" / "last"
    )  # the same rows, the same run
    assert read_json(tmp_path / "a" / "log.json") == read_json(tmp_path / "b" / "log.json")
