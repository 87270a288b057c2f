"""The data the template reads: its files, the datasets cache, the vocabulary, loader workers.

Files that hold no data (a FIFO, a folder, bad labels, bytes that are not UTF-8; CSV lines counted
as an editor counts them); the datasets cache (a file rewritten under its old mtime, a full cache
disk, two first runs at once); the vocabulary learnt from the training file; loader workers. The
root pair's dataset.py has tests/task/test_data.py.

    python -m pytest -q tests/template/test_data_files.py
    python -m pytest -q -m slow tests/template/test_data_files.py    # two first runs at once
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import datasets
import pytest

import dataset
import train
import utils
from conftest import (
    TREE,
    assert_bitwise_equal,
    data_args,
    launch,
    quick_run,
    read_json,
    read_log,
    refused,
    run,
    tiny_tokenizer,
)
from core import options

# ------------------------------------------------------------- files that hold no data, in one line


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


def test_csv_errors_count_lines_the_same_way(tiny_data, tmp_path):
    """A CSV line with too many fields (the reader's error) and one with a missing label (ours):
    both say the line an editor shows, header included."""
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nthe food was great,positive\nthe food,was,bad\n")
    # the reader's own message, which ends in a newline
    refused(["--train_file", extra, "--outdir", tmp_path / "model"], "line 3", one_line=False)
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nthe food was great,positive\nno label here\n")
    refused(["--train_file", missing, "--outdir", tmp_path / "model"], "missing.csv, line 3:")


# ---------------------------------------------------------------- the datasets cache


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
    """Both read, cache and tokenize the same new file into one empty datasets cache at the same
    time (the second run used to die reading a cache file the first replaced)."""
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
    assert read_log(tmp_path / "a" / "log.json") == read_log(tmp_path / "b" / "log.json")


# ------------------------------- a vocabulary learnt from the training file, kept in the checkpoint


def test_training_from_scratch_learns_the_vocabulary_of_the_training_file(tmp_path):
    words = ["zebra", "quantum", "marmalade", "kayak", "obsidian"]
    train_file = tmp_path / "mine.jsonl"
    train_file.write_text(
        "".join(
            f'{{"text": "the {w} is {v}", "label": "{v}"}}\n'
            for w in words
            for v in ("good", "bad")
        )
    )
    args = options.parse_args(["--train_file", str(train_file)])
    tokenizer = dataset.load_tokenizer(TREE / "assets" / "tiny-bert", args)
    assert tokenizer.unk_token_id not in tokenizer("The ZEBRA and the kayak are good")["input_ids"]
    rows = utils.load_rows(train_file)
    cached = list(
        utils.Path(dataset.datasets.config.HF_DATASETS_CACHE, "vocabularies").glob(
            f"{rows._fingerprint}-*"
        )
    )
    assert len(cached) == 1  # cached ...
    cache = cached[0]
    before = cache.stat().st_mtime_ns
    assert (
        dataset.load_tokenizer(TREE / "assets" / "tiny-bert", args).get_vocab()
        == tokenizer.get_vocab()
    )
    assert cache.stat().st_mtime_ns == before  # ... and read back, not learnt again
    model = train.build_model(
        args.model_name_or_path, dataset.generate_dataset(str(train_file), "train", tokenizer, args)
    )
    assert model.config.encoder["vocab_size"] == len(tokenizer)
    # Learnt again in another process (tokenizers seeds its hash maps per process), into an empty
    # cache: the same file, byte for byte, so the same seed gives the same run on every machine.
    learn = (
        f"import sys; sys.path.insert(0, {str(TREE)!r}); import dataset; from core import options; "
        f"dataset.load_tokenizer({str(TREE / 'assets' / 'tiny-bert')!r}, "
        f"options.parse_args(['--train_file', {str(train_file)!r}]))"
    )
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "another-cache")}
    subprocess.run([sys.executable, "-c", learn], env=env, check=True, capture_output=True)
    assert (
        tmp_path / "another-cache" / "vocabularies" / cache.name
    ).read_bytes() == cache.read_bytes()


def test_a_vocabulary_of_many_characters_keeps_every_one(tmp_path):
    """8,100 distinct CJK characters (each a word of its own) and fullwidth punctuation: more than
    VOCABULARY_SIZE, and still none of them [UNK]."""
    characters = [chr(0x4E00 + i) for i in range(8100)]
    train_file = tmp_path / "cjk.jsonl"
    train_file.write_text(
        "".join(
            json.dumps(
                {"text": "".join(characters[k : k + 30]) + "，好！", "label": str(k % 2)},
                ensure_ascii=False,
            )
            + "\n"
            for k in range(0, 8100, 30)
        )
    )
    tokenizer = dataset.load_tokenizer(
        TREE / "assets" / "tiny-bert", options.parse_args(["--train_file", str(train_file)])
    )
    ids = tokenizer("".join(characters) + "，！", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8100 + 2 and tokenizer.unk_token_id not in ids


def test_the_checkpoint_carries_its_tokenizer_and_resume_uses_it(tiny_data, tmp_path):
    outdir = quick_run(tiny_data, tmp_path)
    saved = dataset.load_tokenizer(
        outdir / "last", None
    )  # a checkpoint's own tokenizer, no data needed
    assert (
        saved.get_vocab()
        == dataset.load_tokenizer(
            TREE / "assets" / "tiny-bert", options.parse_args(list(map(str, data_args(tiny_data))))
        ).get_vocab()
    )


# ---------------------------------------------------------------- loader workers


BATCH_16 = ["--batch_size", 16]  # 20 optimizer steps per epoch on the tiny data


def test_loader_workers_read_the_same_batches(tiny_data, tmp_path):
    """Rows read from the cache file in DataLoader workers: the same batches, the same run."""
    args = [*data_args(tiny_data), *BATCH_16, "--epochs", 1]
    run(*args, "--outdir", tmp_path / "plain")
    run(*args, "--outdir", tmp_path / "workers", "--num_workers", 2)
    assert_bitwise_equal(tmp_path / "plain" / "last", tmp_path / "workers" / "last")


@pytest.mark.slow
def test_a_sigterm_while_tokenizing_leaves_no_partial_file_in_the_datasets_cache(tmp_path):
    """datasets' map writes tmpXXXXXXXX in the cache as it goes; a SIGTERM then (the default action
    kills the process at once) left it there for good. The run now exits 143 without one."""
    words = "the a good bad movie film great awful plot actor scene music boring fun".split()
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(60_000):
            text = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12))
            f.write(json.dumps({"text": text, "label": ["pos", "neg"][i % 2]}) + "\n")
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "train.py", "--train_file", str(tmp_path / "train.jsonl"),
         "--outdir", str(tmp_path / "model")],
        cwd=TREE, env={**os.environ, "HF_DATASETS_CACHE": str(cache)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(cache.rglob("tmp*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert list(cache.rglob("tmp*")), "the map never wrote a temporary file"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert list(cache.rglob("tmp*")) == []
