"""Kills training at N random moments, resumes each time, and checks the result bitwise.

    python tools/chaos.py 10          # prints e.g. "10/10 bitwise equal"

Each trial starts the shipped task (shrunk: 320 training lines, 2 epochs, a checkpoint every 3
optimizer steps) under `accelerate launch`, SIGKILLs it after a random delay (so at any moment:
inside a save, between the renames, mid-step, during validation), resumes from last/ (starting
over if nothing was saved yet), and repeats until the run is complete; then it compares the final
weights and log.json with an uninterrupted run. Not part of the default test suite (minutes).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "train.py",
]


def run(args, kill_after=None):
    process = subprocess.Popen(
        LAUNCH + args,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        process.wait(timeout=kill_after)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False


def main(trials):
    work = Path(tempfile.mkdtemp())
    for name, rows in [("train", 320), ("valid", 64)]:
        lines = (ROOT / "data" / f"{name}.jsonl").read_text().splitlines()[:rows]
        (work / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    common = [
        "--train_file",
        str(work / "train.jsonl"),
        "--valid_file",
        str(work / "valid.jsonl"),
        "--epochs",
        "2",
        "--batch_size",
        "16",
        "--save_steps",
        "3",
    ]
    started = time.time()
    run(common + ["--outdir", str(work / "reference")])
    duration = time.time() - started
    reference = load_file(work / "reference" / "last" / "model.safetensors")
    rng, equal = random.Random(0), 0
    for trial in range(trials):
        outdir, kills = work / f"trial{trial}", 0
        while True:
            resumable = (outdir / "last").exists() or (outdir / ".old-last").exists()
            args = (
                ["--resume", str(outdir / "last")]
                if resumable
                else common + ["--outdir", str(outdir), "--overwrite"]
            )
            if run(args, kill_after=rng.uniform(1.0, duration)):
                break
            kills += 1
        weights = load_file(outdir / "last" / "model.safetensors")
        same = weights.keys() == reference.keys() and all(
            weights[k].equal(reference[k]) for k in weights
        )
        same &= json.loads((outdir / "log.json").read_text()) == json.loads(
            (work / "reference" / "log.json").read_text()
        )
        equal += same
        print(
            f"trial {trial}: killed {kills} time(s), {'bitwise equal' if same else 'DIFFERENT'}",
            flush=True,
        )
    print(f"{equal}/{trials} bitwise equal")
    shutil.rmtree(work)
    return equal == trials


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else 10) else 1)
