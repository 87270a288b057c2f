"""The figures the example READMEs give, from the commands they name, on a clean copy of the
repository: each run's log.json (and predict.py's output, where a README quotes it) against the
README's text.

The runs are deterministic: the same machine, the same number of torch threads and the same seed
give bitwise the same log. The README figures were measured with 2 threads (2 CPU cores, as
`accelerate launch` picks there), so the runs here are started with OMP_NUM_THREADS=2 on any
machine. Tolerance: one unit of the figure's last printed digit (0.0086 accepts 0.0085 to 0.0087),
room for a CPU whose kernels round otherwise, and none for a figure that is simply stale.

    python -m pytest -q -m slow tests/template/test_example_figures.py    # ~3 min on 2 cores
"""

import json
import math
import re
import shutil

import pytest
from test_examples import copy_repository

from conftest import ROOT, launch, read_json

# The runs the READMEs name: (example, PACK in its dataset.py or None to leave it, extra flags after
# --config examples/EXAMPLE/train.yaml), by the name FIGURES uses.
RUNS = {
    "seq2seq": ("seq2seq", None, []),
    "sft": ("sft", None, []),
    "sft packed": ("sft", True, ["--batch_size", 8, "--epochs", 10]),
    "token_classification": ("token_classification", None, []),
    "causal_lm": ("causal_lm", None, []),
    "causal_lm unpacked": ("causal_lm", False, ["--max_len", 128, "--batch_size", 32]),
    "question_answering": ("question_answering", None, []),
}

# (README folder, run, what is measured, the figure as the README prints it). What: (log.json
# entry, "train loss" or a valid_log key), ("best", metric) for the checkpoint's best_metric (as
# exp() when the metric is a perplexity of the loss), or ("per text",) for the perplexity of
# predict.py's lines over valid.txt with best/ (exp of the token-weighted mean loss).
FIGURES = [
    ("seq2seq", "seq2seq", ("Epoch 11", "loss"), "0.0086"),
    ("seq2seq", "seq2seq", ("Epoch 11", "exact_match"), "0.995"),
    ("seq2seq", "seq2seq", ("Epoch 11", "chrf"), "99.94"),
    ("seq2seq", "seq2seq", ("Epoch 11", "train loss"), "0.0084"),
    ("seq2seq", "seq2seq", ("Epoch 0", "exact_match"), "0.015"),
    ("seq2seq", "seq2seq", ("Epoch 0", "chrf"), "65.6"),
    ("seq2seq", "seq2seq", ("Epoch 3", "exact_match"), "0.89"),
    ("sft", "sft", ("Epoch 5", "loss"), "0.089"),
    ("sft", "sft", ("Epoch 5", "exact_match"), "0.975"),
    ("sft", "sft", ("Epoch 5", "train loss"), "0.046"),
    ("sft", "sft", ("Epoch 0", "exact_match"), "0.145"),
    ("sft", "sft", ("Epoch 2", "exact_match"), "0.74"),
    ("sft", "sft packed", ("Epoch 9", "exact_match"), "0.975"),
    ("token_classification", "token_classification", ("Epoch 9", "f1"), "0.982"),
    ("token_classification", "token_classification", ("Epoch 9", "precision"), "0.979"),
    ("token_classification", "token_classification", ("Epoch 9", "recall"), "0.986"),
    ("token_classification", "token_classification", ("Epoch 9", "macro_f1"), "0.983"),
    ("token_classification", "token_classification", ("Epoch 9", "accuracy"), "0.997"),
    ("causal_lm", "causal_lm", ("best", "perplexity"), "2.69"),
    ("causal_lm", "causal_lm", ("per text",), "2.52"),
    ("causal_lm", "causal_lm unpacked", ("best", "perplexity"), "2.03"),
    ("causal_lm", "causal_lm unpacked", ("per text",), "2.03"),
    ("question_answering", "question_answering", ("Epoch 3", "exact_match"), "80.4"),
    ("question_answering", "question_answering", ("Epoch 3", "f1"), "84.0"),
    ("question_answering", "question_answering", ("Epoch 2", "f1"), "84.4"),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """run name -> its outdir, each run made once, in a copy of the repository of its own."""
    done = {}

    def get(name):
        if name not in done:
            example, pack, extra = RUNS[name]
            repo = tmp_path_factory.mktemp(name.replace(" ", "-")) / "repo"
            copy_repository(repo)
            for user_file in ("modeling.py", "dataset.py"):
                shutil.copy(repo / "examples" / example / user_file, repo / user_file)
            if pack is not None:
                source = (repo / "dataset.py").read_text()
                assignment = r"^PACK = (True|False)(?=\s*(#|$))"  # not the docstring's words
                assert len(re.findall(assignment, source, re.M)) == 1
                (repo / "dataset.py").write_text(
                    re.sub(assignment, f"PACK = {pack}", source, flags=re.M)
                )
            outdir = repo / "model"
            config = ["--config", f"examples/{example}/train.yaml", "--outdir", outdir]
            launch(*config, *extra, cwd=repo, env={"OMP_NUM_THREADS": "2"}, timeout=900)
            done[name] = repo, outdir
        return done[name]

    return get


def value_of(repo, outdir, what):
    if what[0] == "best":
        best = read_json(outdir / "last" / "trainer_state.json")["best_metric"]
        return math.exp(best) if what[1] == "perplexity" else best
    if what[0] == "per text":
        predictions = repo / "per-text.jsonl"
        if not predictions.exists():
            launch(
                "--checkpoint", outdir / "best", "--input_file",
                repo / "examples" / "causal_lm" / "data" / "valid.txt",
                "--output_file", predictions,
                cwd=repo, script="predict.py", env={"OMP_NUM_THREADS": "2"}, timeout=900,
            )  # fmt: skip
        rows = [json.loads(line) for line in predictions.read_text().splitlines()]
        tokens = sum(row["tokens"] for row in rows)
        return math.exp(sum(row["loss"] * row["tokens"] for row in rows) / tokens)
    entry = read_json(outdir / "log.json")[what[0]]
    return entry["train_log"]["loss"] if what[1] == "train loss" else entry["valid_log"][what[1]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "readme, run, what, printed", FIGURES, ids=[f"{f[1]}:{' '.join(f[2])}" for f in FIGURES]
)
def test_a_readme_figure_is_what_its_command_gives(measured, readme, run, what, printed):
    text = (ROOT / "examples" / readme / "README.md").read_text()
    assert re.search(rf"(?<![\d.]){re.escape(printed)}(?![\d])", text), (
        f"examples/{readme}/README.md no longer gives {printed}"
    )
    value = value_of(*measured(run), what)
    unit = 10.0 ** -len(printed.split(".")[1])
    assert abs(value - float(printed)) <= unit * 1.0001, (
        f"examples/{readme}/README.md gives {printed} for {run} {what}; the command gives {value}"
    )
