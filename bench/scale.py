"""How train.py scales: time per epoch against the number of rows, and how long a checkpoint takes
to save and to resume, for the shipped tiny model and for a ~100M-parameter BERT-shaped config.

    python bench/scale.py                       # ~2 min on 2 CPU cores
    python bench/scale.py --rows 2000 4000 8000 16000 --big_layers 24

Each run is a fresh `python train.py` process with a timer around the optimizer step, around
checkpoint.save (every file written, fsynced and renamed into place) and around what --resume
does before the first step (checking the manifest's sha256 of every file, loading the weights,
optimizer, scheduler and RNG). Epoch time is taken from the first optimizer step to the last, so
start-up, tokenization and validation are outside it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same synthetic text as bench/speed.py.
from speed import vocabulary, write_synthetic  # noqa: E402


def child(argv):
    """Runs train.main(argv) with timers; prints one JSON line of what they saw."""
    sys.path.insert(0, str(ROOT))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import train
    from core import checkpoint, resume

    steps, timings = [], {"save": [], "resume": 0.0}
    register_optimizer_step_post_hook(lambda *_: steps.append(time.perf_counter()))

    def timed(function, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                if key == "save":
                    timings["save"].append(elapsed)
                else:
                    timings["resume"] += elapsed

        return wrapper

    checkpoint.save = timed(checkpoint.save, "save")
    checkpoint.verify = timed(checkpoint.verify, "resume")
    resume.restore = timed(resume.restore, "resume")  # weights, objects, position, RNG
    train.main(argv)
    print(
        "BENCH "
        + json.dumps({"steps": len(steps), "first_to_last_step_s": steps[-1] - steps[0], **timings})
    )


def run(argv, cwd):
    result = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if result.returncode != 0:
        sys.exit(f"train.py {' '.join(map(str, argv))} failed:\n{result.stderr[-3000:]}")
    line = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH ") :])


def big_model(folder, layers):
    """A BERT-base-shaped config (hidden 768, FFN 3072), from scratch: dataset.py learns its
    vocabulary from the training file, as for the tiny model; no download."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((ROOT / "assets" / "tiny-bert" / "config.json").read_text())
    config.update(
        hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    per_layer = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    embeddings = (config["vocab_size"] + config["max_position_embeddings"] + 2) * 768 + 2 * 768
    return folder, layers * per_layer + embeddings


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[1500, 3000, 6000], help="training rows per run"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per size; the table gives medians"
    )
    parser.add_argument(
        "--big_layers", type=int, default=14, help="layers of the big config (14: ~99M parameters)"
    )
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = ROOT / "assets" / "tiny-bert"
    words = vocabulary(tiny)
    write_synthetic(workdir / "valid.jsonl", 200, words, 128, 24, seed=1)
    common = [
        "--valid_file",
        workdir / "valid.jsonl",
        "--epochs",
        1,
        "--batch_size",
        32,
        "--seed",
        42,
    ]

    print(
        f"time per epoch against rows (tiny model, 1 epoch, batch 32, {os.cpu_count()} CPU cores, "
        f"median of {args.repeats} runs in rotated order):"
    )
    # The first N rows of one file: every size has the same distribution of lengths.
    write_synthetic(workdir / "train-all.jsonl", max(args.rows), words, 128, 24, seed=42)
    lines = (workdir / "train-all.jsonl").read_text().splitlines(keepends=True)
    epochs = {rows: [] for rows in args.rows}
    for rows in args.rows:
        (workdir / f"train-{rows}.jsonl").write_text("".join(lines[:rows]))
    for repeat in range(args.repeats):
        for rows in args.rows[repeat % len(args.rows) :] + args.rows[: repeat % len(args.rows)]:
            result = run(
                [
                    "--model_name_or_path",
                    tiny,
                    "--train_file",
                    workdir / f"train-{rows}.jsonl",
                    *common,
                    "--outdir",
                    workdir / f"scale-{rows}-{repeat}",
                ],
                ROOT,
            )
            epochs[rows].append(
                result["first_to_last_step_s"] * result["steps"] / (result["steps"] - 1)
            )
    per_row = []
    for rows in args.rows:
        epoch = statistics.median(epochs[rows])
        per_row.append(epoch / rows)
        print(f"  {rows:7d} rows  {epoch:7.2f} s/epoch  {1e3 * epoch / rows:.3f} ms/row")
    print(f"  ms/row, largest / smallest: {per_row[-1] / per_row[0]:.3f} (1.0 = linear)")

    print(
        "\ncheckpoint save and resume (save: every file written, fsynced, renamed; "
        "resume: verified and loaded):"
    )
    write_synthetic(workdir / "train-small.jsonl", 200, words, 32, 12, seed=7)
    big, parameters = big_model(workdir / "big-bert", args.big_layers)
    for label, model in [("tiny", tiny), (f"~{parameters / 1e6:.0f}M", big)]:
        outdir = workdir / f"ckpt-{label}"
        options = [
            "--model_name_or_path",
            model,
            "--train_file",
            workdir / "train-small.jsonl",
            *common,
            "--max_len",
            32,
            "--batch_size",
            2,
            "--outdir",
            outdir,
        ]
        saved = run([*options, "--stop_after_steps", 2], ROOT)
        resumed = run(["--resume", outdir / "last", "--stop_after_steps", 3], ROOT)
        size = sum(p.stat().st_size for p in (outdir / "last").iterdir())
        print(
            f"  {label:6s} {size / 2**20:8.1f} MiB on disk  save {saved['save'][0]:6.2f} s  "
            f"resume {resumed['resume']:6.2f} s"
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
