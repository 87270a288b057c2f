"""Plots a run's log.json: train and valid loss, and the validation metrics, per epoch or per
step (a run with --eval_steps: every validation at its step, the training loss of every log).

    python tools/plot.py model/log.json                 # writes model/log.png
    python tools/plot.py model/log.json -o curves.png

Works while a run is going (log.json is rewritten whole at every save). Needs matplotlib.
"""

import argparse
import json
import sys
from pathlib import Path

try:
    import matplotlib
except ImportError:
    sys.exit("tools/plot.py needs matplotlib: pip install matplotlib")
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def read_log(path):
    """(the x axis's name, {x: {"train_log": {...}, "valid_log": {...}}} sorted by x): per epoch
    ("Epoch N" entries), or per step ("Step N") when validations are logged at steps."""
    path = Path(path)
    if not path.is_file():
        sys.exit(f"error: {path}: no such file. Give the log.json of a run, e.g. model/log.json.")
    try:
        log = json.loads(path.read_text())
        if not all(isinstance(entry, dict) for entry in log.values()):
            raise ValueError('each "Epoch N" or "Step N" should hold {"train_log": {...}, ...}')
        kinds = {key.split()[0]: {} for key in log}
        for key, entry in log.items():
            kind, number = key.split()
            kinds[kind][int(number)] = entry
    except (ValueError, AttributeError) as e:
        sys.exit(f"error: {path}: not a log.json of train.py ({e}).")
    steps = kinds.get("Step", {})
    if any("valid_log" in entry for entry in steps.values()):
        return "step", dict(sorted(steps.items()))
    if not kinds.get("Epoch"):
        sys.exit(f"error: {path}: no epoch has finished yet, nothing to plot.")
    return "epoch", dict(sorted(kinds["Epoch"].items()))


def series(epochs, part, key):
    """The x values and values of log[part][key] where it is a number."""
    points = [(epoch, entry.get(part, {}).get(key)) for epoch, entry in epochs.items()]
    points = [(epoch, value) for epoch, value in points if isinstance(value, (int, float))]
    return [epoch for epoch, _ in points], [value for _, value in points]


def plot(axis_name, epochs, title, output):
    metrics = sorted(
        {
            key
            for entry in epochs.values()
            for key, value in entry.get("valid_log", {}).items()
            if key != "loss" and isinstance(value, (int, float))
        }
    )
    figure, axes = plt.subplots(
        1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False
    )
    loss_axis = axes[0][0]
    for part, name in [("train_log", "train"), ("valid_log", "valid")]:
        x, y = series(epochs, part, "loss")
        if x:
            loss_axis.plot(x, y, marker="o", label=f"{name} loss")
    loss_axis.set(xlabel=axis_name, ylabel="loss", title="loss")
    if metrics:
        metric_axis = axes[0][1]
        for key in metrics:
            metric_axis.plot(*series(epochs, "valid_log", key), marker="o", label=key)
        metric_axis.set(xlabel=axis_name, title="validation metrics")
    for axis in axes[0]:
        axis.xaxis.get_major_locator().set_params(integer=True)  # epochs, not fractions of one
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log", help="a run's log.json, e.g. model/log.json")
    parser.add_argument(
        "-o", "--output", help="the PNG to write (default: log.png next to the log)"
    )
    args = parser.parse_args(argv)
    axis_name, entries = read_log(args.log)
    output = args.output or Path(args.log).with_suffix(".png")
    plot(axis_name, entries, str(args.log), output)
    print(f"Wrote {output} ({len(entries)} {axis_name}s)")


if __name__ == "__main__":
    main()
