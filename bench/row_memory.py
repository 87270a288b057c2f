"""Host memory per training row: the peak anonymous memory (RssAnon, what the process itself holds)
of the default job stopped after its first optimizer step (`python train.py --stop_after_steps 1`,
one process) on generated training files of 10k and 1M rows, and (peak(1M) - peak(10k)) / 990k:
what each row costs beyond the fixed cost. Each size runs twice on its own datasets cache: COLD (a
fresh, empty HF_DATASETS_CACHE, as a user's first run: the file is read, the vocabulary learnt, the
rows tokenized) and WARM (the same run again: all of it read back from the cache). bench/speed.py
runs it too.

RssAnon is sampled every 5 ms. Peak RSS (VmHWM) is printed beside it; it also counts the pages of
memory-mapped files the process touched (datasets' cache files: clean pages, which the kernel
drops when it needs the memory).

    python bench/row_memory.py              # ~4 minutes on 2 cores
                                            # (the 1M-row file is tokenized once)
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
CACHES = ("cold", "warm")
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
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    peaks = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("PEAK")]
    if result.returncode != 0 or not peaks:
        sys.exit(result.stderr[-3000:])
    return tuple(map(float, peaks[-1]))


def measure(rows=(10_000, 1_000_000), progress=print):
    """{"peaks": {(cache, rows): (peak RSS MiB, peak RssAnon MiB)} of the default job stopped after
    one step, cache "cold" then "warm"; "read_us": read_speed() of the largest tokenized cache}."""
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as folder:
        work = Path(folder)
        for n in rows:
            data = work / f"train-{n}.jsonl"
            write_data(data, n)
            env = {
                **os.environ,
                "HF_DATASETS_CACHE": str(work / f"cache-{n}"),
                "OMP_NUM_THREADS": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            }
            command = [
                "train.py",
                "--train_file",
                str(data),
                "--stop_after_steps",
                "1",
                "--epochs",
                "1",
            ]
            for cache in CACHES:  # the first run on an empty cache, then the same run again
                peaks[cache, n] = peaks_mib(
                    [*command, "--outdir", str(work / f"model-{n}-{cache}")], env
                )
                progress(
                    f"  memory: {n:>9} rows, {cache} cache: peak RSS {peaks[cache, n][0]:.0f} MiB, "
                    f"peak RssAnon {peaks[cache, n][1]:.0f} MiB"
                )
        tokenized = max(work.rglob("cache-*.arrow"), key=lambda path: path.stat().st_size)
        return {"peaks": peaks, "read_us": read_speed(tokenized)}


def read_speed(path, batches=300, batch_size=32, repeats=3):
    """Microseconds per batch of random rows of a tokenized cache file read as dataset.py's Dataset
    reads them (datasets' Dataset.__getitems__): the best of `repeats`."""
    import datasets

    rows = datasets.Dataset.from_file(str(path))
    order = random.Random(0).choices(range(len(rows)), k=batches * batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(0, len(order), batch_size):
            rows.__getitems__(order[k : k + batch_size])
        best = min(best, (time.perf_counter() - start) / batches * 1e6)
    return best


def per_row(peaks, cache, field):
    """Bytes per row beyond a fixed cost between the smallest and the largest file; field 0: peak
    RSS, 1: RssAnon."""
    sizes = sorted(n for c, n in peaks if c == cache)
    small, large = sizes[0], sizes[-1]
    return (peaks[cache, large][field] - peaks[cache, small][field]) * 2**20 / (large - small)


def report(figures):
    peaks = figures["peaks"]
    print(
        f"  {'MiB at the peak':26s} {'cold RssAnon':>12s} {'warm RssAnon':>12s} "
        f"{'cold RSS':>10s} {'warm RSS':>10s}"
    )
    for n in sorted({n for _, n in peaks}):
        print(
            f"  {f'{n} rows':26s} {peaks['cold', n][1]:12.0f} {peaks['warm', n][1]:12.0f} "
            f"{peaks['cold', n][0]:10.0f} {peaks['warm', n][0]:10.0f}"
        )
    print(f"  {'bytes per training row beyond a fixed cost':58s} {'cold':>6s} {'warm':>6s}")
    print(
        f"    {'peak RssAnon':56s} {per_row(peaks, 'cold', 1):6.1f} "
        f"{per_row(peaks, 'warm', 1):6.1f}   target <= 16"
    )
    print(
        f"    {'peak RSS (with the pages of mapped files)':56s} {per_row(peaks, 'cold', 0):6.1f} "
        f"{per_row(peaks, 'warm', 0):6.1f}"
    )
    print(f"  {'batch of 32 random rows, read through datasets, us':58s} {figures['read_us']:6.0f}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000])
    args = parser.parse_args()
    report(measure(args.rows))


if __name__ == "__main__":
    main()
