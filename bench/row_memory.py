"""Host memory per training row: peak RSS of the default job stopped after its first optimizer step
(`python train.py --stop_after_steps 1`, one process), on generated training files of 10k and 1M
rows, each measured on a warm cache (tokenized and vocabulary built once before), and
(peak(1M) - peak(10k)) / 990k printed: what each row costs beyond the fixed cost. bench/speed.py
runs it too.

Peak RSS (VmHWM) also counts the pages of memory-mapped files the process has touched (clean pages,
which the kernel drops when it needs the memory); training rows are read with os.pread
(utils.CachedRows), so the tokenized cache adds none. The peak of anonymous memory (RssAnon,
sampled every 5 ms) is what the process itself holds.

    python bench/row_memory.py              # ~2 minutes on 2 cores (the 1M-row file is tokenized once)
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_rss import write_data  # noqa: E402  (the same generated rows)

ROOT = Path(__file__).resolve().parent.parent
PROBE = f"""
import runpy, sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from data_rss import status
peak_anon, done = [0.0], threading.Event()
def sample():
    while not done.wait(0.005):
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
threading.Thread(target=sample, daemon=True).start()
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
done.set()
print("PEAK", status("VmHWM"), max(peak_anon[0], status("RssAnon")))
"""


def peaks_mib(command, env):
    """Runs train.py in a child that reports its own peak RSS (VmHWM) and peak RssAnon, in MiB."""
    result = subprocess.run([sys.executable, "-c", PROBE, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    peaks = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("PEAK")]
    if result.returncode != 0 or not peaks:
        sys.exit(result.stderr[-3000:])
    return tuple(map(float, peaks[-1]))


def measure(rows=(10_000, 1_000_000), progress=print):
    """{"peaks": {rows: (peak RSS MiB, peak RssAnon MiB)} of the default job stopped after one step, warm
    cache, "reads": read_speed() of the largest tokenized cache}."""
    work = Path(tempfile.mkdtemp(prefix="bench-rows-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    peaks = {}
    for n in rows:
        data = work / f"train-{n}.jsonl"
        write_data(data, n)
        command = ["train.py", "--train_file", str(data), "--stop_after_steps", "1", "--epochs", "1"]
        peaks_mib([*command, "--outdir", str(work / f"warm-{n}")], env)  # tokenize, learn the vocabulary
        peaks[n] = peaks_mib([*command, "--outdir", str(work / f"model-{n}")], env)
        progress(f"  memory: {n:>9} rows: peak RSS {peaks[n][0]:.0f} MiB, peak RssAnon {peaks[n][1]:.0f} MiB")
    tokenized = max((work / "cache").rglob("cache-*.arrow"), key=lambda path: path.stat().st_size)
    return {"peaks": peaks, "reads": read_speed(tokenized)}


def read_speed(path, batches=300, batch_size=32, repeats=3):
    """Microseconds per batch of random rows of a tokenized cache file, read by hand (what train.py
    does: utils.CachedRows) and through datasets' memory map: the best of `repeats`, side by side."""
    import datasets
    sys.path.insert(0, str(ROOT))
    from utils import CachedRows
    mine, theirs = CachedRows(datasets.Dataset.from_file(str(path))), datasets.Dataset.from_file(str(path))
    order = random.Random(0).choices(range(len(theirs)), k=batches * batch_size)
    best = {}
    for _ in range(repeats):
        for name, rows in (("by hand", mine), ("datasets", theirs)):
            start = time.perf_counter()
            for k in range(0, len(order), batch_size):
                rows.__getitems__(order[k:k + batch_size])
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / batches * 1e6)
    return best


def per_row(peaks):
    """Bytes per row beyond a fixed cost, (RSS, RssAnon), between the smallest and the largest file."""
    small, large = min(peaks), max(peaks)
    return tuple((peaks[large][i] - peaks[small][i]) * 2**20 / (large - small) for i in (0, 1))


def report(figures):
    peaks, reads = figures["peaks"], figures["reads"]
    rss, anon = per_row(peaks)
    for n, (peak, peak_anon) in sorted(peaks.items()):
        print(f"  {n:>9} rows: peak RSS {peak:6.0f} MiB, peak RssAnon {peak_anon:6.0f} MiB")
    print(f"  {'bytes per training row beyond a fixed cost (peak RSS)':58s} {rss:6.1f}   target <= 16")
    print(f"  {'bytes per training row beyond a fixed cost (peak RssAnon)':58s} {anon:6.1f}")
    print(f"  {'batch of 32 random rows, read by hand (os.pread), us':58s} {reads['by hand']:6.0f}")
    print(f"  {'batch of 32 random rows, read through datasets, us':58s} {reads['datasets']:6.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000])
    args = parser.parse_args()
    report(measure(args.rows))


if __name__ == "__main__":
    main()
