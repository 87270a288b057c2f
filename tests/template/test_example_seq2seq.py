"""examples/seq2seq (numbers to English words with a tiny T5): metrics, data, end to end.

Its metrics and data checks in this process, and end to end in a copy of the repository with the
pair copied over modeling.py and dataset.py: bitwise resume, metrics of generated text that improve
and that best/ reproduces, two processes, predict.py, --check and --sample_every.

    python -m pytest -q tests/template/test_example_seq2seq.py            # metrics and data
    python -m pytest -q -m slow tests/template/test_example_seq2seq.py    # end to end (~1-2 min)
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from test_examples import copy_repository, load_module
from transformers import AutoTokenizer

from conftest import ROOT, assert_bitwise_equal, launch, read_json, read_log

EXAMPLE = ROOT / "examples" / "seq2seq"
MODEL = "examples/seq2seq/tiny-t5"
modeling = load_module(EXAMPLE / "modeling.py", "seq2seq_modeling")
dataset = load_module(EXAMPLE / "dataset.py", "seq2seq_dataset")
# 100 optimizer steps per epoch: enough for the first exact matches by the last epoch (untrained:
# none).
TRAIN_ROWS, VALID_ROWS, BATCH_SIZE, EPOCHS = 1600, 40, 16, 5
STOP_AFTER = 150  # in the middle of the second epoch


def args(**options):
    return SimpleNamespace(max_len=128, dataset_config=None, model_name_or_path=MODEL, **options)


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / MODEL)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ---------------------------------------------------------------- the metrics alone


@pytest.mark.parametrize(
    "hypothesis, reference, expected",
    [
        (
            "ab",
            "abc",
            700 / 11,
        ),  # 1-grams P 2/2 R 2/3, 2-grams P 1/1 R 1/2: P 1, R 7/12, F2 = 5PR / (4P + R)
        ("abcdefgh", "ab", 55.0),  # orders the reference lacks count for neither side: P 11/56, R 1
        ("a b c", "abc", 100.0),  # spaces are not characters to chrF
        ("xyz", "abc", 0.0),
        ("", "abc", 0.0),
    ],
)
def test_chrf_of_one_pair_is_sacrebleus(hypothesis, reference, expected):
    """The expected values by hand, and as sacrebleu's CHRF().sentence_score gives them."""
    assert modeling.chrf(modeling.chrf_statistics(hypothesis, reference)) == pytest.approx(expected)


def test_corpus_chrf_sums_the_statistics_and_exact_match_counts_whole_texts():
    """Two examples: corpus chrF from summed n-gram counts (1-grams 4/4 of 5, 2-grams 2/2 of 3: P 1,
    R 11/15, F2 = 5500/71, sacrebleu's corpus_score), not the mean of 63.6 and 100; one exact
    match."""
    tokenizer = tiny_tokenizer()
    generated, targets = ["one two", "nine"], ["one two three", "nine"]
    labels = tokenizer(targets, padding=True, return_tensors="pt").input_ids
    batch = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": labels.masked_fill(labels == tokenizer.pad_token_id, -100),
    }

    class Writer:  # stands for a model whose generate() writes `generated`
        config, generation_config = SimpleNamespace(decoder_start_token_id=0), None

        def generate(self, **kwargs):
            return tokenizer(generated, padding=True, return_tensors="pt").input_ids

    gathered = modeling.metric_inputs(Writer(), tokenizer, batch, None)
    assert gathered["exact"].tolist() == [False, True]
    assert gathered["chrf_statistics"].shape == (
        2,
        6,
        3,
    )  # a fixed size per example: gathers across processes
    metrics = modeling.compute_metrics(gathered)
    assert metrics["exact_match"] == 0.5
    # "onetwo" / "onetwothree" and "nine" / "nine", summed
    one_two = modeling.chrf_statistics("one two", "one two three")
    nine = modeling.chrf_statistics("nine", "nine")
    assert gathered["chrf_statistics"].sum(0).tolist() == [
        [a + b for a, b in zip(x, y)] for x, y in zip(one_two, nine)
    ]
    assert metrics["chrf"] == pytest.approx(
        modeling.chrf(gathered["chrf_statistics"].sum(0).tolist())
    )
    rows = modeling.predictions(Writer(), tokenizer, batch, None)
    assert rows == [
        {"generated": "one two", "target": "one two three", "exact_match": False},
        {"generated": "nine", "target": "nine", "exact_match": True},
    ]
    assert modeling.loss_items(batch).tolist() == (labels != tokenizer.pad_token_id).sum(1).tolist()


def test_corpus_chrf_by_hand():
    statistics = torch.tensor(
        [modeling.chrf_statistics("ab", "abc"), modeling.chrf_statistics("x y", "xy")]
    )
    assert modeling.chrf(statistics.sum(0).tolist()) == pytest.approx(5500 / 71)


def test_forward_without_target_gives_outputs_for_predict():
    """predict.py calls model(**batch) before predictions(): rows without a target have no decoder
    input."""
    model = modeling.Model(modeling.AutoConfig.from_pretrained(ROOT / MODEL)).eval()
    encoded = tiny_tokenizer()(["4213", "7"], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**encoded)
    assert outputs.loss is None and outputs.logits.shape == (2, 1, model.config.vocab_size)


# ---------------------------------------------------------------- the data alone


def test_targets_become_labels_and_predict_needs_no_target(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_rows(
        tmp_path / "pairs.jsonl",
        [
            {"source": "4213", "target": "four thousand two hundred thirteen"},
            {"source": "7", "target": "seven"},
        ],
    )
    pairs = dataset.generate_dataset(path, "train", tokenizer, args())
    assert (
        tokenizer.decode(pairs[0]["labels"]) == "four thousand two hundred thirteen</s>"
    )  # ends: learns to stop
    target_tokens = len(pairs[0]["labels"])
    assert pairs[1]["input_ids"] == tokenizer("7").input_ids and pairs.lengths.tolist() == [
        5 + target_tokens,
        2 + 2,
    ]
    batch = pairs.collate(
        pairs.__getitems__([0, 1])
    )  # "7 </s>", "seven </s>" padded to the first pair
    assert batch["labels"][1].tolist()[2:] == [-100] * (target_tokens - 2)
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    sources = write_rows(tmp_path / "sources.jsonl", [{"source": "12"}, {"source": "9000"}])
    predicting = dataset.generate_dataset(sources, "validation", tokenizer, args(), predicting=True)
    assert len(predicting) == 2 and "labels" not in predicting.collate(
        predicting.__getitems__([0, 1])
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"source": "12"}, "the 'target' field is missing"),
        ({"target": "twelve"}, "the 'source' field is missing"),
        ({"source": "12", "target": "  "}, "the 'target' field is empty"),
        ({"source": "", "target": "twelve"}, "the 'source' field is empty"),
        (
            {"source": ["1", "2"], "target": "twelve"},
            r"the 'source' field is \['1', '2'\], not a text",
        ),
        ({"source": "12", "target": True}, "the 'target' field is True, not a text"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, row, message):
    path = write_rows(tmp_path / "pairs.jsonl", [{"source": "7", "target": "seven"}, row])
    with pytest.raises(
        SystemExit, match=rf"^error: .*pairs.jsonl, line 2: {message}\. Each row needs"
    ) as error:
        dataset.generate_dataset(path, "train", tiny_tokenizer(), args())
    assert "\n" not in str(error.value.code)


def test_numbers_read_as_texts_a_missing_column_and_a_tokenizer_without_pad(tmp_path):
    path = tmp_path / "pairs.csv"  # the CSV reader types a column of digits as numbers
    path.write_text("source,target\n7,seven\n8,\n")
    with pytest.raises(SystemExit, match=r"pairs.csv, line 3: the 'target' field is empty"):
        dataset.generate_dataset(str(path), "train", tiny_tokenizer(), args())
    numbers = write_rows(
        tmp_path / "numbers.jsonl",
        [{"source": 7, "target": "seven"}, {"source": "8", "target": "eight"}],
    )
    assert (
        dataset.generate_dataset(numbers, "train", tiny_tokenizer(), args())[0]["input_ids"]
        == tiny_tokenizer()("7").input_ids
    )
    no_target = write_rows(tmp_path / "sources.jsonl", [{"source": "7"}])
    with pytest.raises(SystemExit, match=r"sources.jsonl: no 'target' column \(found: source\)"):
        dataset.generate_dataset(no_target, "train", tiny_tokenizer(), args())
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(
        SystemExit, match=r"the tokenizer of examples/seq2seq/tiny-t5 has no pad token"
    ):
        dataset.generate_dataset(no_target, "validation", tokenizer, args(), predicting=True)


# ---------------------------------------------------------------- end to end, through train.py


def fork(folder, train_rows=TRAIN_ROWS):
    """A copy of the repository with the pair over modeling.py / dataset.py and the first rows of
    the example's data in train.jsonl / valid.jsonl; returns it and the options that train on
    them."""
    repo = folder / "repo"
    copy_repository(repo)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(repo / "examples" / "seq2seq" / user_file, repo / user_file)
    for split, rows in [("train", train_rows), ("valid", VALID_ROWS)] if train_rows else []:
        lines = (
            (repo / "examples" / "seq2seq" / "data" / f"{split}.jsonl")
            .read_text()
            .splitlines()[:rows]
        )
        (repo / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    options = [
        "--model_name_or_path",
        MODEL,
        "--train_file",
        "train.jsonl",
        "--valid_file",
        "valid.jsonl",
        "--epochs",
        EPOCHS,
        "--batch_size",
        BATCH_SIZE,
        "--lr",
        3e-3,
        "--num_warmup_steps",
        3,
        "--metric_for_best",
        "exact_match",
    ]
    return repo, options


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train.py three times: uninterrupted (printing samples every 100 steps), and the same stopped
    after step 150, then resumed."""
    repo, options = fork(tmp_path_factory.mktemp("seq2seq"))

    def run(*extra, cache):  # each its own datasets cache: the first two run at the same time
        return launch(*options, *extra, cwd=repo, env={"HF_DATASETS_CACHE": str(repo / cache)})

    with ThreadPoolExecutor(2) as pool:  # two single-process runs on two cores
        full = pool.submit(run, "--outdir", "full", "--sample_every", 100, cache="cache-full")
        stopped = pool.submit(
            run, "--outdir", "stopped", "--stop_after_steps", STOP_AFTER, cache="cache-stopped"
        )
        full, stopped = full.result(), stopped.result()
    resumed = launch(
        "--resume", "stopped/last", cwd=repo, env={"HF_DATASETS_CACHE": str(repo / "cache-stopped")}
    )
    return SimpleNamespace(repo=repo, full=full, stopped=stopped, resumed=resumed)


def recompute(repo, checkpoint):
    """Exact match and chrF over the whole validation file from a checkpoint, with no train.py:
    loaded by Model.from_pretrained, generated in this process in batches of 7 (not the runs'
    16)."""
    model = modeling.Model.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    valid_set = dataset.generate_dataset(str(repo / "valid.jsonl"), "validation", tokenizer, args())
    gathered = {}
    with torch.no_grad():
        for start in range(0, len(valid_set), 7):
            batch = valid_set.collate(
                valid_set.__getitems__(list(range(start, min(start + 7, len(valid_set)))))
            )
            for key, value in modeling.metric_inputs(
                model, tokenizer, batch, model(**batch)
            ).items():
                gathered.setdefault(key, []).append(value)
    return modeling.compute_metrics({key: torch.cat(values) for key, values in gathered.items()})


def best_epoch_log(outdir):
    state = read_json(outdir / "best" / "trainer_state.json")
    return state["log"][f"Epoch {state['epoch'] - 1}"]["valid_log"]


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_bitwise_equal(runs):
    repo = runs.repo
    assert (
        f"Stopped by --stop_after_steps after {STOP_AFTER} optimizer steps" in runs.stopped.stdout
    )
    assert (
        read_json(repo / "stopped" / "last" / "trainer_state.json")["global_step"] == EPOCHS * 100
    )
    assert_bitwise_equal(repo / "full" / "last", repo / "stopped" / "last")
    assert_bitwise_equal(repo / "full" / "best", repo / "stopped" / "best")
    assert read_log(repo / "full" / "log.json") == read_log(repo / "stopped" / "log.json")


@pytest.mark.slow
def test_log_has_exact_match_and_chrf_and_they_improve(runs):
    log = read_log(runs.repo / "full" / "log.json")
    valid = [log[f"Epoch {i}"]["valid_log"] for i in range(EPOCHS)]
    assert set(valid[0]) == {"loss", "exact_match", "chrf"}
    assert all(0 <= v["exact_match"] <= 1 and 0 <= v["chrf"] <= 100 for v in valid)
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert (
        valid[-1]["exact_match"] > valid[0]["exact_match"] and valid[-1]["chrf"] > valid[0]["chrf"]
    )
    assert "best/ keeps the epoch with the highest valid exact_match" in runs.full.stdout


@pytest.mark.slow
def test_best_loads_with_from_pretrained_and_generate_reproduces_its_metrics(runs):
    logged = best_epoch_log(runs.repo / "full")
    metrics = recompute(runs.repo, runs.repo / "full" / "best")
    assert metrics == pytest.approx(
        {"exact_match": logged["exact_match"], "chrf": logged["chrf"]}, rel=1e-6
    )
    assert type(modeling.Model.from_pretrained(runs.repo / "full" / "best")).__name__ == "Model"


@pytest.mark.slow
def test_samples_show_input_generated_and_gold(runs):
    out = runs.full.stdout
    assert out.count("--- samples at step ") == EPOCHS  # every 100 steps
    assert out.count("\ninput: ") == 3 * EPOCHS and out.count("  generated: ") == 3 * EPOCHS
    sources = {
        json.loads(line)["source"]: json.loads(line)["target"]
        for line in (runs.repo / "train.jsonl").read_text().splitlines()
    }
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("input: "):  # a training pair: its source, then its gold target
            assert lines[i + 2] == f"  gold: {sources[line.removeprefix('input: ')]}"


@pytest.mark.slow
def test_predict_writes_one_generated_text_per_row(runs):
    repo = runs.repo
    rows = [json.loads(line) for line in (repo / "valid.jsonl").read_text().splitlines()]
    write_rows(repo / "sources.jsonl", [{"source": row["source"]} for row in rows])
    for name in ("sources", "valid"):  # without and with a target column
        subprocess.run(
            [
                sys.executable,
                "predict.py",
                "--checkpoint",
                "full/best",
                "--input_file",
                f"{name}.jsonl",
                "--output_file",
                f"{name}.predictions.jsonl",
            ],
            cwd=repo,
            check=True,
            capture_output=True,
            env={**os.environ, "HF_DATASETS_CACHE": str(repo / "cache-full")},
        )
    plain = [
        json.loads(line) for line in (repo / "sources.predictions.jsonl").read_text().splitlines()
    ]
    scored = [
        json.loads(line) for line in (repo / "valid.predictions.jsonl").read_text().splitlines()
    ]
    assert [p["index"] for p in plain] == list(range(VALID_ROWS)) and all(
        set(p) == {"index", "generated"} for p in plain
    )
    assert [p["generated"] for p in plain] == [p["generated"] for p in scored]
    assert [p["target"] for p in scored] == [row["target"] for row in rows]
    exact = sum(p["exact_match"] for p in scored) / VALID_ROWS
    assert exact == pytest.approx(
        best_epoch_log(repo / "full")["exact_match"]
    )  # batches of 64 here


@pytest.mark.slow
def test_two_processes_gather_the_whole_validation_set(tmp_path):
    """40 validation rows at 16 per process: the last batch is padded across the processes, and
    gather_for_metrics must drop exactly the padding for the metrics to match a one-process
    count."""
    repo, options = fork(tmp_path, train_rows=320)
    launch(*options, "--epochs", 1, "--outdir", "model", cwd=repo, processes=2)
    assert read_json(repo / "model" / "last" / "trainer_state.json")["num_processes"] == 2
    logged = best_epoch_log(repo / "model")
    assert recompute(repo, repo / "model" / "best") == pytest.approx(
        {"exact_match": logged["exact_match"], "chrf": logged["chrf"]}, rel=1e-6
    )


@pytest.mark.slow
def test_check_passes_on_the_example(tmp_path):
    repo, _ = fork(tmp_path, train_rows=None)  # the whole data, as train.yaml has it
    result = launch("--config", "examples/seq2seq/train.yaml", "--check", cwd=repo, check=False)
    assert result.returncode == 0 and "\nFAIL" not in "\n" + result.stdout, (
        result.stdout + result.stderr[-2000:]
    )
    assert "--check: every check passed" in result.stdout
