"""Every --lr_scheduler_type spans the whole run: short in-process trainings, the lr read from log.json.

pytest tests/template/test_schedules.py
"""

import pytest

import train
from conftest import data_args, read_json


@pytest.mark.parametrize(
    "kind, final_lr",
    [
        ("linear", 0.0),
        ("cosine", 0.0),
        ("cosine_with_restarts", 0.0),
        ("polynomial", 1e-7),
        ("constant", 1e-3),
        ("constant_with_warmup", 1e-3),
    ],
)
def test_every_scheduler_spans_the_whole_run(kind, final_lr, tiny_data, tmp_path):
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--lr_scheduler_type",
            kind,
            "--num_warmup_steps",
            "5",
            "--epochs",
            "2",
            "--batch_size",
            "32",
            "--outdir",
            str(tmp_path),
        ]
    )
    lrs = [entry["train_log"]["lr"] for entry in read_json(tmp_path / "log.json").values()]
    assert lrs[-1] == pytest.approx(final_lr, abs=1e-12)
    if kind in (
        "linear",
        "constant_with_warmup",
    ):  # 10 steps per epoch: halfway through, warmup is over
        assert lrs[0] == pytest.approx(1e-3 * (10 / 15 if kind == "linear" else 1), rel=1e-9)
