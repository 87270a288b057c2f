"""Host memory per training row: peak RSS of the default job stopped after its first optimizer step
(`python train.py --stop_after_steps 1`, one process), on generated training files of 10k and 1M
rows, each measured on a warm cache (tokenized and vocabulary built once before), and
(peak(1M) - peak(10k)) / 990k printed: what each row costs beyond the fixed cost.

    python bench/row_memory.py              # ~3 minutes on 2 cores (the 1M-row file is tokenized once)
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_rss import write_data  # noqa: E402  (the same generated rows)

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib(command, env):
    """Runs `command` in a child that reports its own peak RSS (VmHWM) in MiB."""
    probe = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    result = subprocess.run([sys.executable, "-c", probe, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    peaks = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK")]
    if result.returncode != 0 or not peaks:
        sys.exit(result.stderr[-3000:])
    return peaks[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rows-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "cache")}
    peaks = {}
    for rows in args.rows:
        data = work / f"train-{rows}.jsonl"
        write_data(data, rows)
        command = ["train.py", "--train_file", str(data), "--stop_after_steps", "1", "--epochs", "1"]
        peak_rss_mib([*command, "--outdir", str(work / f"warm-{rows}")], env)  # tokenize, learn the vocabulary
        peaks[rows] = peak_rss_mib([*command, "--outdir", str(work / f"model-{rows}")], env)
        print(f"{rows:>9} rows: peak RSS {peaks[rows]:.0f} MiB", flush=True)
    small, large = args.rows
    print(f"bytes per row beyond a fixed cost: {(peaks[large] - peaks[small]) * 2**20 / (large - small):.1f}")


if __name__ == "__main__":
    main()
