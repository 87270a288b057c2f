"""DeepSpeed ZeRO-2 and ZeRO-3 against DDP on the same 2 CPU processes (gloo), side by side: the
start-up (launch to the first step: imports, data, model, the engine) and the training samples/s
of `accelerate launch train.py` on a MiniLM-sized encoder (384 wide, 6 layers, from scratch) over
the shipped data, then a checkpoint. One run, rotated order, median of --repeats. bench/speed.py
runs it too (its "deepspeed" section).

    python bench/deepspeed_speed.py         # needs `pip install deepspeed`; ~3 min on 2 CPU cores
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from threads import minilm_sized

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # contender: (accelerate launch options, environment)
    "DDP": (["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "1"}),
    "ZeRO-2": (["--config_file", "configs/accelerate/deepspeed_zero2_cpu.yaml"], {}),
    "ZeRO-3": (["--config_file", "configs/accelerate/deepspeed_zero3_cpu.yaml"], {}),
}
SUMMARY = re.compile(r"(\d+) optimizer steps in ([\d.]+) s: ([\d.]+) samples/s")


def measure(steps=30, repeats=3, progress=print):
    """{contender: (median start-up seconds, median samples/s, median whole-process seconds)}."""
    work = Path(tempfile.mkdtemp(prefix="bench-deepspeed-"))
    model = minilm_sized(work)
    options = ["--model_name_or_path", model, "--stop_after_steps", steps, "--batch_size", 16]
    options += ["--log_every", 1000]
    base = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    base["DS_ACCELERATOR"] = "cpu"
    subprocess.run(  # the vocabulary and the tokenized data into the cache, untimed
        [sys.executable, "train.py", *map(str, options[:2]), "--stop_after_steps", "1"]
        + ["--outdir", str(work / "warm")],
        cwd=ROOT,
        env=base,
        check=True,
        capture_output=True,
    )
    figures = {name: [] for name in CONFIGS}
    for repeat in range(repeats):
        names = list(CONFIGS)[repeat % 3 :] + list(CONFIGS)[: repeat % 3]
        for name in names:
            launch, env = CONFIGS[name]
            port = ["--main_process_port", "0"]
            command = [sys.executable, "-m", "accelerate.commands.launch", *launch, *port]
            command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            outdir = work / f"run-{repeat}-{name}"
            start = time.perf_counter()
            result = subprocess.run(
                [*command, "train.py", *map(str, options), "--outdir", str(outdir)],
                cwd=ROOT,
                env={**base, **env},
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - start
            found = SUMMARY.search(result.stdout + result.stderr)
            if result.returncode != 0 or not found:
                sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
            state = json.loads((outdir / "last" / "trainer_state.json").read_text())
            assert state["num_processes"] == 2, state  # two processes, not two runs of one
            loop, rate = float(found[2]), float(found[3])
            figures[name].append((wall - loop, rate, wall))
            progress(
                f"  deepspeed, repeat {repeat + 1}/{repeats}: {name:7s} start-up "
                f"{wall - loop:5.1f} s, {rate:6.1f} samples/s, {wall:5.1f} s in all"
            )
    return {
        name: tuple(statistics.median(column) for column in zip(*values))
        for name, values in figures.items()
    }


def report(medians, steps):
    print(f"  {'':7s} {'start-up':>9s} {'samples/s':>10s} {'whole process':>14s}")
    for name, (startup, rate, wall) in medians.items():
        print(f"  {name:7s} {startup:8.1f}s {rate:10.1f} {wall:13.1f}s")
    ddp = medians["DDP"]
    for name in ("ZeRO-2", "ZeRO-3"):
        startup, rate, wall = medians[name]
        print(
            f"  {name} / DDP: start-up {startup / ddp[0]:.2f}x, samples/s {rate / ddp[1]:.2f}x, "
            f"whole process {wall / ddp[2]:.2f}x  ({steps} steps of 2 x 16 and a checkpoint)"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report(measure(args.steps, args.repeats), args.steps)


if __name__ == "__main__":
    main()
