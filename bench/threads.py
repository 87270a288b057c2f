"""CPU threads where users run train.py: `accelerate launch train.py` (the README's command) against
`python train.py`, and against accelerate's own default of one thread per process (what train.py got
before it chose), on a MiniLM-sized encoder (384 wide, 6 layers) where threads matter. One run,
side by side, rotated order, median of --repeats. bench/speed.py runs it too.

    python bench/threads.py                 # prints seconds per run and the ratios
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH, PYTHON, ONE_THREAD = (
    "accelerate launch train.py",
    "python train.py",
    "accelerate launch, 1 thread (before)",
)


def minilm_sized(folder):
    """A MiniLM-sized encoder (assets/tiny-bert's config 384 wide, 6 layers; no weights: from
    scratch) in folder/minilm; returns that folder."""
    model = Path(folder) / "minilm"
    model.mkdir()
    config = json.loads((ROOT / "assets" / "tiny-bert" / "config.json").read_text())
    config.update(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    (model / "config.json").write_text(json.dumps(config))
    return model


def measure(steps=30, repeats=3, progress=print):
    """{contender: median seconds of the whole process: `steps` optimizer steps and a
    checkpoint}."""
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    model = minilm_sized(work)
    options = [
        "train.py",
        "--model_name_or_path",
        str(model),
        "--stop_after_steps",
        str(steps),
        "--batch_size",
        "32",
        "--log_every",
        "1000",
    ]
    launch = [
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
    ]
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    contenders = {
        LAUNCH: (launch + options, base),
        PYTHON: ([sys.executable] + options, base),
        ONE_THREAD: (launch + options, {**base, "OMP_NUM_THREADS": "1"}),
    }
    warm = [
        sys.executable,
        "train.py",
        "--model_name_or_path",
        str(model),
        "--stop_after_steps",
        "1",
    ]
    subprocess.run(
        [*warm, "--outdir", str(work / "warm")], cwd=ROOT, env=base, check=True, capture_output=True
    )  # the vocabulary and the tokenized data into the cache, untimed
    times = {name: [] for name in contenders}
    for repeat in range(repeats):
        names = list(contenders)[repeat % 3 :] + list(contenders)[: repeat % 3]
        for name in names:
            command, env = contenders[name]
            start = time.perf_counter()
            result = subprocess.run(
                [*command, "--outdir", str(work / f"run-{repeat}-{names.index(name)}")],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
            times[name].append(time.perf_counter() - start)
            progress(
                f"  threads, repeat {repeat + 1}/{repeats}: {name:38s} {times[name][-1]:6.1f} s"
            )
    return {name: statistics.median(t) for name, t in times.items()}


def report(medians, steps):
    for name, seconds in medians.items():
        print(f"  {name:38s} {seconds:6.1f} s for {steps} steps and a checkpoint (whole process)")
    print(
        f"  {'accelerate launch / python train.py (time)':58s} "
        f"{medians[LAUNCH] / medians[PYTHON]:6.3f}"
        f"   target ~1 (the launcher's own start-up only)"
    )
    print(
        f"  {'1 thread (before) / accelerate launch now (time)':58s} "
        f"{medians[ONE_THREAD] / medians[LAUNCH]:6.3f}"
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
