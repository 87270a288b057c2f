"""Bad input: one clear message naming the problem, a non-zero exit, nothing written or damaged.

Most cases call train.main() in this process (fast); one runs the CLI to check what a user sees.

    pytest tests/task/test_bad_input.py
"""

import json
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, data_args, launch, weights


@pytest.fixture
def outdir(tmp_path):
    return tmp_path / "model"


def fails(argv, *fragments):
    """Runs train.main(argv), expects it to exit with a message holding every fragment; returns the
    message."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write(path, text):
    path.write_text(text)
    return path


def test_missing_data_file(tiny_data, outdir, tmp_path):
    fails(
        [
            "--train_file",
            tmp_path / "nope.jsonl",
            "--valid_file",
            tiny_data / "valid.jsonl",
            "--outdir",
            outdir,
        ],
        "nope.jsonl: no such data file",
        "--train_file",
    )
    assert not outdir.exists()


def test_empty_data_file(tiny_data, outdir, tmp_path):
    empty = write(tmp_path / "empty.jsonl", "\n")
    fails(
        ["--train_file", tiny_data / "train.jsonl", "--valid_file", empty, "--outdir", outdir],
        "empty.jsonl: the file holds no examples",
    )
    assert not outdir.exists()


def test_zero_byte_file_and_unknown_file_type(tiny_data, outdir, tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    fails(
        ["--train_file", tiny_data / "train.jsonl", "--valid_file", empty, "--outdir", outdir],
        "empty.jsonl: the file holds no examples",
    )
    typo = write(tmp_path / "valid.ndjson", (tiny_data / "valid.jsonl").read_text())
    fails(
        ["--train_file", tiny_data / "train.jsonl", "--valid_file", typo, "--outdir", outdir],
        "valid.ndjson: unknown file type '.ndjson'. Give a .jsonl",
    )
    assert not outdir.exists()


def test_malformed_jsonl_line_names_file_and_line(tiny_data, outdir, tmp_path):
    bad = write(
        tmp_path / "bad.jsonl",
        '{"text": "good", "label": "positive"}\n'
        '{"text": "fine", "label": "negative"}\n{"text": "broken", \n',
    )
    fails(
        ["--train_file", bad, "--valid_file", tiny_data / "valid.jsonl", "--outdir", outdir],
        "bad.jsonl, line 3: not a JSON object",
    )
    assert not outdir.exists()


def test_missing_field_and_empty_text(tiny_data, outdir, tmp_path):
    no_label = write(
        tmp_path / "nolabel.jsonl", '{"text": "good", "label": "positive"}\n{"text": "x"}\n'
    )
    fails(
        ["--train_file", no_label, "--outdir", outdir],
        "nolabel.jsonl, line 2: the 'label' field is missing",
    )
    empty_text = write(tmp_path / "emptytext.jsonl", '{"text": " ", "label": "positive"}\n')
    fails(
        ["--train_file", empty_text, "--outdir", outdir],
        "emptytext.jsonl, line 1: the 'text' field is empty",
    )


def test_csv_row_with_missing_column(tiny_data, outdir, tmp_path):
    bad = write(tmp_path / "bad.csv", "text,label\nthe food was great,positive\nno label here\n")
    fails(
        ["--train_file", bad, "--valid_file", tiny_data / "valid.jsonl", "--outdir", outdir],
        "bad.csv, line 3: the 'label' field is missing or empty",
    )


def test_unknown_label_in_valid_file(tiny_data, outdir, tmp_path):
    valid = write(
        tmp_path / "valid.jsonl",
        '{"text": "ok", "label": "positive"}\n{"text": "hm", "label": "angry"}\n',
    )
    fails(
        ["--train_file", tiny_data / "train.jsonl", "--valid_file", valid, "--outdir", outdir],
        "valid.jsonl, line 2: label 'angry' is not among the training labels (negative, neutral, "
        "positive)",
    )


def test_misspelled_option_is_an_error():
    message = fails(
        ["--epoch", "3"], "unrecognized arguments: --epoch 3"
    )  # --epochs: no prefix taken
    assert message.count("\n") == 0 and "--help lists the options" in message


def test_unknown_key_in_config_file(tmp_path):
    config = write(tmp_path / "options.yaml", "epochs: 2\nlearning_rate: 0.1\n")
    fails(["--config", config], "options.yaml: unknown option 'learning_rate'")


def test_resume_from_nothing(outdir, tmp_path):
    fails(
        ["--resume", tmp_path / "model" / "last", "--outdir", outdir],
        "not a checkpoint of this template",
    )
    assert not outdir.exists()


def test_outdir_holding_a_run_is_not_overwritten_without_resume_or_overwrite(tiny_data, outdir):
    (outdir / "last").mkdir(parents=True)
    write(
        outdir / "last" / "manifest.json", '{"files": {}}'
    )  # what marks a checkpoint of this template
    write(outdir / "log.json", '{"Epoch 0": {}}')
    fails(
        [*data_args(tiny_data), "--outdir", outdir],
        "already holds a run (last, log.json)",
        "--resume",
        "--overwrite",
    )
    assert json.loads((outdir / "log.json").read_text()) == {"Epoch 0": {}}


def test_non_finite_gradients_stop_before_any_update(tiny_data, outdir):
    fails(
        [
            *data_args(tiny_data),
            "--outdir",
            outdir,
            "--lr",
            "1e30",
            "--max_grad_norm",
            "0",
            "--log_every",
            "1",
        ],
        "non-finite gradients in 1 of the optimizer steps up to step 2 (epoch 0)",
        "no update was made",
        "--skip_nonfinite",
    )
    assert not (outdir / "last").exists()


def test_skip_nonfinite_skips_and_counts_and_saves_nothing_non_finite(tiny_data, outdir):
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--outdir",
            str(outdir),
            "--lr",
            "1e30",
            "--max_grad_norm",
            "0",
            "--skip_nonfinite",
            "--epochs",
            "1",
            "--batch_size",
            "32",
        ]
    )
    train_log = json.loads((outdir / "log.json").read_text())["Epoch 0"]["train_log"]
    assert (
        1 <= train_log["skipped_steps"] <= 9
    )  # 10 steps: the first one is finite, it makes the rest NaN
    assert all(torch.isfinite(t).all() for t in weights(outdir / "last").values())


def test_the_user_sees_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--outdir",
            str(tmp_path / "model"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'}: no such data file. Check --train_file / "
        "--valid_file."
    ]


def test_under_accelerate_launch_the_message_comes_from_train_py_without_its_traceback(tmp_path):
    """accelerate's launcher adds a traceback of its own (CalledProcessError); train.py adds
    none."""
    result = launch(
        "--train_file", tmp_path / "missing.jsonl", "--outdir", tmp_path / "model", check=False
    )
    assert result.returncode == 1
    assert "missing.jsonl: no such data file" in result.stderr
    assert 'train.py", line' not in result.stderr
