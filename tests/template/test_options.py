"""Options: defaults < a --config file < flags, and what --resume takes from the checkpoint.

pytest tests/template/test_options.py
"""

import pytest

from core import options


def test_option_precedence_defaults_then_config_file_then_flags(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("# comments are fine\nepochs: 7\nlr: 0.01\n")
    args = options.parse_args(["--config", str(config), "--lr", "0.5"])
    assert (args.epochs, args.lr, args.batch_size) == (7, 0.5, 32)
    json_config = tmp_path / "options.json"
    json_config.write_text('{"batch_size": 4}')
    assert options.parse_args(["--config", str(json_config)]).batch_size == 4


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
