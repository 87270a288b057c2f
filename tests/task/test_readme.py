"""The README's code blocks that are meant to run, run as a user would, and what they claim checked.

    python -m pytest -q -m slow tests/task/test_readme.py

A block preceded by the line `<!-- runs in tests/task/test_readme.py -->` runs here, in the README's
order: shell blocks with bash (set -e), python blocks with python. They run in a copy of the
repository (the files git tracks or would track, as they are in the working tree), with this
virtual environment's bin first on PATH, the hub offline and caches of their own. The only change
to the copy: the sample training data is cut to its first 1000 rows, so that the default job takes
a few seconds and the whole test well under a minute on 2 CPU cores; the commands are the README's.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_json, read_log
from conftest import epochs as epochs_of  # (`epochs` is a local name here)

MARKER = "<!-- runs in tests/task/test_readme.py -->"
LANGUAGES = {"sh": "bash", "bash": "bash", "shell": "bash", "console": "bash", "python": "python"}
TRAIN_ROWS = 1000
CHECKPOINT_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "lr.bin",
    "my_config.json",
    "optimizer.pt",
    "trainer_state.json",
    "rng_state_0.safetensors",
    "manifest.json",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def marked_blocks(text):
    """[(line number of the marker, 'bash' or 'python', code)] for every marked block, in order."""
    lines, blocks = text.splitlines(), []
    for number, line in enumerate(lines, 1):
        if line.strip() != MARKER:
            continue
        start = number  # index of the line after the marker
        while start < len(lines) and not lines[start].strip():
            start += 1
        opening = lines[start] if start < len(lines) else ""
        if opening.startswith("```"):
            language = opening[3:].strip() or "sh"
            end = next(
                (i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), None
            )
            assert end is not None, (
                f"README.md line {number}: the marked block is not closed with ```"
            )
            code = lines[start + 1 : end]
        elif opening.startswith("    "):
            language, end = "sh", start
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            code = [line[4:] for line in lines[start:end]]
        else:
            raise AssertionError(
                f"README.md line {number}: the marker is not followed by a code block"
            )
        assert language in LANGUAGES, (
            f"README.md line {number}: a marked block in {language!r}, not sh or python"
        )
        blocks.append((number, LANGUAGES[language], "\n".join(code).strip() + "\n"))
    return blocks


def copy_repository(destination):
    """The working tree's versions of the files git tracks, plus new files it does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not (source.is_file() or source.is_symlink()):  # deleted in the working tree
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name, follow_symlinks=False)


def user_environment(home):
    bin_dir = (
        Path(sys.prefix) / "bin" if sys.prefix != sys.base_prefix else Path(sys.executable).parent
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ACCELERATE_")
        and k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "PYTHONPATH")
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
    )
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def option(code, name):
    found = re.search(rf"{name}[ =](\S+)", code)
    return found and found.group(1)


class Checks:
    """What each kind of block claims, checked right after it ran in the copy `repo`."""

    def __init__(self, repo):
        self.repo, self.seen, self.first_log = repo, set(), None

    def __call__(self, language, code, stdout, output):
        if language == "python":
            self.loaded_model(stdout)
        for command in code.splitlines():
            command = command.split("#")[0]
            if re.search(r"\btrain\.py\b", command) and "--resume" not in command:
                self.trained(command)
            elif re.search(r"\btrain\.py\b", command):
                self.resumed(command, output)
            elif "predict.py" in command:
                self.predicted(command)
            elif "tools/plot.py" in command:
                self.plotted(command)
            elif re.match(r"\s*(ls|cat|head)\b", command):
                self.seen.add("look")
        if "head -3 predictions.jsonl" in code:
            shown = [line for line in output.splitlines() if line.startswith('{"index"')]
            assert len(shown) == 3, (
                f"head -3 predictions.jsonl showed {len(shown)} prediction lines"
            )

    def trained(self, command):
        outdir = self.repo / (option(command, "--outdir") or "model")
        for name in ("best", "last"):
            missing = [f for f in CHECKPOINT_FILES if not (outdir / name / f).is_file()]
            assert not missing, f"{outdir / name} lacks {missing}"
        assert (outdir / ".lock").is_file()
        epochs = read_json(outdir / "last" / "my_config.json")["epochs"]
        log = read_log(outdir / "log.json")
        assert list(epochs_of(log)) == [f"Epoch {i}" for i in range(epochs)]
        assert {"loss", "accuracy", "macro_f1"} <= set(log[f"Epoch {epochs - 1}"]["valid_log"])
        self.first_log = log
        self.seen.add("train")

    def resumed(self, command, output):
        outdir = self.repo / Path(option(command, "--resume")).parent
        epochs = int(
            option(command, "--epochs") or read_json(outdir / "last" / "my_config.json")["epochs"]
        )
        log = read_log(outdir / "log.json")
        assert list(epochs_of(log)) == [f"Epoch {i}" for i in range(epochs)]
        assert self.first_log and all(log[k] == v for k, v in self.first_log.items()), (
            "the resumed run did not keep the first run's log.json"
        )
        first_new = len(epochs_of(self.first_log))
        assert f"[Epoch {first_new}] train loss" in output, (
            "the resumed run did not train the next epoch"
        )
        assert "[Epoch 0] train loss" not in output, "the resumed run started over"
        assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == epochs
        self.seen.add("resume")

    def predicted(self, command):
        rows = (self.repo / option(command, "--input_file")).read_text().splitlines()
        output = self.repo / (option(command, "--output_file") or "predictions.jsonl")
        checkpoint = self.repo / (option(command, "--checkpoint") or "model/best")
        labels = set(read_json(checkpoint / "config.json")["id2label"].values())
        predictions = [json.loads(line) for line in output.read_text().splitlines()]
        assert len(predictions) == len([row for row in rows if row.strip()])
        assert [p["index"] for p in predictions] == list(range(len(predictions)))
        assert all(p["label"] in labels and 0 < p["score"] <= 1 for p in predictions)
        self.seen.add("predict")

    def plotted(self, command):
        log = Path(option(command, "tools/plot.py"))
        png = self.repo / (option(command, "-o") or log.with_suffix(".png"))
        assert png.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"
        self.seen.add("plot")

    def loaded_model(self, stdout):
        labels = set(read_json(self.repo / "model" / "best" / "config.json")["id2label"].values())
        assert stdout.strip().splitlines()[-1:] and stdout.strip().splitlines()[-1] in labels, (
            "the loading snippet did not print a label"
        )
        self.seen.add("load")


@pytest.mark.slow  # trains the sample task (shrunk) and resumes it: ~30 s on 2 CPU cores
def test_readme_blocks_run(tmp_path):
    blocks = marked_blocks((ROOT / "README.md").read_text())
    repo = tmp_path / "repo"
    try:
        copy_repository(repo)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout with git installed: {e}")
    train_file = repo / "data" / "train.jsonl"
    train_file.write_text("\n".join(train_file.read_text().splitlines()[:TRAIN_ROWS]) + "\n")
    env, check = user_environment(tmp_path / "hf"), Checks(repo)
    for line, language, code in blocks:
        command = ["python", "-"] if language == "python" else ["bash", "-c", "set -e\n" + code]
        started = time.monotonic()
        result = subprocess.run(
            command,
            input=code if language == "python" else None,
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        print(
            f"--- README.md line {line} ({language}, {time.monotonic() - started:.1f} s):\n"
            f"{code}{output[-3000:]}"
        )
        assert result.returncode == 0, (
            f"README.md line {line}: the block exited {result.returncode}:\n{code}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
        try:
            check(language, code, result.stdout, output)
        except AssertionError as e:
            raise AssertionError(f"README.md line {line}: {e}\n{code}\n{output[-5000:]}") from None
    assert {"train", "look", "resume", "load", "predict", "plot"} <= check.seen, (
        f"the README's marked blocks cover only {sorted(check.seen)}"
    )
