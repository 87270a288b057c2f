"""Peak memory of the data path against the size of the data: dataset.py's generate_dataset() on a
generated training file of N rows, then one shuffled pass over every batch, as train.py makes it.

    python bench/data_rss.py                      # 10,000 and 1,000,000 rows
                                                  # (~3 minutes on 2 cores)
    python bench/data_rss.py --rows 10000 100000

Each size runs in a fresh process with an empty datasets cache, then once more on the warm cache
(the second run of train.py on the same file). Printed per run: seconds to build the dataset,
seconds for the pass, the peak RSS (VmHWM: includes the pages of datasets' memory-mapped cache
files that the pass touched, which the kernel drops when it needs the memory) and the peak
anonymous memory (RssAnon, sampled: what the process itself holds). The loader here is torch's own
shuffled one, whose order is a Python list (~36 bytes a row); train.py's holds 4 bytes a row.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the food was great awful fine service slow friendly cold warm price cheap expensive room "
    "staff clean dirty view noisy quiet again never always would recommend not really"
).split()


def write_data(path, rows):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            text = " ".join(rng.choices(WORDS, k=rng.randint(4, 40)))
            f.write(
                json.dumps({"text": text, "label": rng.choice(["negative", "neutral", "positive"])})
                + "\n"
            )


def status(field):
    """A field of /proc/self/status in MiB (VmHWM: peak RSS; RssAnon: anonymous memory now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(path):
    """Builds the dataset and reads every batch once; prints one JSON line of figures."""
    sys.path.insert(0, str(ROOT))
    import torch

    from core import options
    from dataset import generate_dataset, load_tokenizer

    peak_anon = [status("RssAnon")]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak_anon.append(status("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    args = options.parse_args(["--train_file", str(path)])
    tokenizer = load_tokenizer(
        ROOT / "assets" / "tiny-bert", args
    )  # learns the vocabulary (cached)
    dataset = generate_dataset(path, "train", tokenizer, args)
    built = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, 32, shuffle=True, collate_fn=dataset.collate)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in loader)
    passed = time.perf_counter()
    done.set()
    print(
        json.dumps(
            {
                "rows": len(dataset),
                "tokens": tokens,
                "build_s": built - start,
                "pass_s": passed - built,
                "peak_rss_mib": status("VmHWM"),
                "peak_anon_mib": max(peak_anon),
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    print(
        f"{'rows':>10} {'cache':>6} {'build s':>8} {'pass s':>7} "
        f"{'peak RSS MiB':>13} {'peak RssAnon MiB':>17}"
    )
    with tempfile.TemporaryDirectory(prefix="data-rss-") as folder:
        for rows in args.rows:
            path = Path(folder) / f"train-{rows}.jsonl"
            write_data(path, rows)
            env = {
                **os.environ,
                "HF_DATASETS_CACHE": str(Path(folder) / f"cache-{rows}"),
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            }
            for cache in ("cold", "warm"):
                result = subprocess.run(
                    [sys.executable, __file__, "--child", str(path)],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                print(
                    f"{rows:>10,} {cache:>6} {figures['build_s']:>8.1f} {figures['pass_s']:>7.1f} "
                    f"{figures['peak_rss_mib']:>13.0f} {figures['peak_anon_mib']:>17.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
