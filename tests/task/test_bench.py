"""The benchmarks run, and what makes their ratios fair holds: every contender trains on the same
batches. No timing is asserted (these machines are shared): the figures are printed, not tested.

    pytest tests/task/test_bench.py
"""

import re
import subprocess
import sys

import pytest

from conftest import ROOT


def bench(script, *args):
    result = subprocess.run(
        [sys.executable, f"bench/{script}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_speed_contenders_see_the_same_batches():
    out = bench(
        "speed.py",
        "--sections",
        "throughput",
        "--rows",
        256,
        "--batch_size",
        16,
        "--repeats",
        1,
        "--only",
        "bare",
        "template",
        "trainer",
        "original",
        "--no-host_reads",
    )
    for pair in ("template and bare", "template and trainer", "original and template"):
        assert f"{pair} saw the same batches" in out
    assert "DIFFERENT" not in out
    rows = {
        m[1]: float(m[2])
        for m in re.finditer(r"^(bare|template|trainer|original)\s+([\d.]+)", out, re.M)
    }
    assert set(rows) == {"bare", "template", "trainer", "original"} and all(
        v > 0 for v in rows.values()
    )
    assert re.search(r"template / bare \(same batches\)\s+[\d.]+", out)


@pytest.mark.slow  # ~30 s: six train.py processes, one with a 768-wide model
def test_scale_reports_epochs_and_checkpoints():
    out = bench("scale.py", "--rows", 64, 128, "--repeats", 1, "--big_layers", 1)
    assert len(re.findall(r"^\s+(64|128) rows\s+[\d.]+ s/epoch", out, re.M)) == 2
    assert re.search(r"largest / smallest: [\d.]+", out)
    sizes = [
        float(m)
        for m in re.findall(r"([\d.]+) MiB on disk  save\s+[\d.]+ s  resume\s+[\d.]+ s", out)
    ]
    assert len(sizes) == 2 and sizes[1] > 10 * sizes[0]  # the BERT-base-wide config is much bigger


@pytest.mark.slow  # ~40 s: a dozen short runs of train.py and one of Trainer
def test_speed_prints_the_startup_threads_and_memory_ratios():
    out = bench(
        "speed.py",
        "--sections",
        "startup",
        "threads",
        "memory",
        "--repeats",
        1,
        "--threads_steps",
        2,
        "--memory_rows",
        300,
        3000,
    )
    figures = {
        m[1]: float(m[2])
        for m in re.finditer(r"^ {2,4}(\S.*?)\s{2,}(-?[\d.]+)(?: s|\s|$)", out, re.M)
    }
    for label in (
        "template",
        "trainer",
        "import train",
        "start-up to step 1 and a checkpoint: template / trainer",
        "accelerate launch / python train.py (time)",
        "1 thread (before) / accelerate launch now (time)",
        "peak RssAnon",
        "peak RSS (with the pages of mapped files)",
        "batch of 32 random rows, read through datasets, us",
    ):
        assert label in figures, f"{label!r} not printed:\n{out}"
    assert (
        0
        < figures["start-up to step 1 and a checkpoint: template / trainer"]
        == pytest.approx(figures["template"] / figures["trainer"], abs=0.01)
    )
    assert out.index("start-up:") < out.index("threads (") < out.index("memory per training row")
