"""Options: where each value comes from, and values checked before anything happens.

Defaults < a --config file (which may build on another) < flags; what --resume takes from the
checkpoint; types and ranges, in one line; --help; predict.py's --output_file.

    python -m pytest -q tests/template/test_options.py
"""

import shutil

import pytest

import predict
from conftest import assert_bitwise_equal, data_args, read_json, refused, run, snapshot
from core import options

# ---------------------------------------------------------------- where each value comes from


def test_option_precedence_defaults_then_config_file_then_flags(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("# comments are fine\nepochs: 7\nlr: 0.01\n")
    args = options.parse_args(["--config", str(config), "--lr", "0.5"])
    assert (args.epochs, args.lr, args.batch_size) == (7, 0.5, 32)
    json_config = tmp_path / "options.json"
    json_config.write_text('{"batch_size": 4}')
    assert options.parse_args(["--config", str(json_config)]).batch_size == 4


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


def test_resume_takes_the_checkpoints_options_and_refuses_a_changed_one(tmp_path):
    checkpoint = tmp_path / "last"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text('{"files": {}}')
    (checkpoint / "my_config.json").write_text(
        '{"epochs": 4, "batch_size": 8, "outdir": "elsewhere", "stop_after_steps": 3}'
    )
    args = options.parse_args(["--resume", str(checkpoint), "--epochs", "6"])
    # --outdir: the folder the checkpoint is in now, not the one it was saved from ("elsewhere")
    assert (args.epochs, args.batch_size, args.outdir, args.stop_after_steps) == (
        6,
        8,
        str(tmp_path),
        0,
    )
    with pytest.raises(SystemExit, match="--batch_size 16 differs from .*'s 8"):
        options.parse_args(["--resume", str(checkpoint), "--batch_size", "16"])
    assert (
        options.parse_args(
            ["--resume", str(checkpoint), "--batch_size", "16", "--ignore_mismatch"]
        ).batch_size
        == 16
    )


# ----------------------------------------------------------- values checked before anything happens


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


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "per process; reduce if out of memory (default: 32)" in text and "(default: linear)" in text
    )


# ------------------------------------------ predict.py's --output_file writes over nothing of value


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


@pytest.mark.parametrize("value", ["last", "auto"])
def test_resume_in_an_options_file_is_the_flag(value, tiny_data, tmp_path):
    """`resume:` in a --config file takes the checkpoint's options and continues it exactly, as
    --resume does (it used to continue with train.py's defaults, batch 16 -> 32, silently)."""
    args = [*data_args(tiny_data), "--batch_size", 16, "--epochs", 1, "--seed", 7]
    run(*args, "--outdir", tmp_path / "whole")
    run(*args, "--outdir", tmp_path / "model", "--stop_after_steps", 5)
    config = tmp_path / "resume.yaml"
    last = tmp_path / "model" / "last"
    config.write_text(
        f"resume: {last if value == 'last' else 'auto'}\noutdir: {tmp_path / 'model'}\n"
    )
    run("--config", config)
    state = read_json(last / "trainer_state.json")
    assert state["global_step"] == 20 and read_json(last / "my_config.json")["batch_size"] == 16
    assert_bitwise_equal(tmp_path / "whole" / "last", last)
