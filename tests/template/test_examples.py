"""The example pairs (causal LM, token classification), trained end to end by train.py.

The task pairs of examples/, copied over modeling.py and dataset.py in a copy of the repository and
trained end to end by the unchanged train.py: outputs, metrics, learning, samples, bitwise resume.

    python -m pytest -q tests/template/test_examples.py            # the examples' own functions
    python -m pytest -q -m slow tests/template/test_examples.py    # end to end, 2 processes (~40 s)
"""

import importlib.util
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from conftest import ROOT, assert_bitwise_equal, epochs, launch, read_json, read_log

# Per example: its default model, the suffix of its data files, the metric it adds to log.json.
EXAMPLES = {
    "causal_lm": {
        "model": "examples/causal_lm/tiny-gpt2",
        "suffix": ".txt",
        "metric": "perplexity",
    },
    "token_classification": {
        "model": "examples/token_classification/tiny-bert-ner",
        "suffix": ".jsonl",
        "metric": "f1",
    },
}
TRAIN_ROWS, VALID_ROWS, BATCH_SIZE = 160, 40, 16  # 10 optimizer steps per epoch
STOP_AFTER = 13  # inside the second epoch, between two log windows
TAGS = [
    "O",
    "B-LOC",
    "I-LOC",
    "B-ORG",
    "I-ORG",
    "B-PER",
    "I-PER",
]  # the token classification data's


def load_module(path, name):
    """An example's modeling.py or dataset.py, under a name that does not shadow the default
    pair."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_repository(destination):
    """Everything a user's fork holds but .git, caches and the outputs of earlier runs."""

    def ignore(folder, names):
        skipped = {
            n for n in names if n in {".git", "__pycache__", ".pytest_cache", ".venv", "runs"}
        }
        if Path(folder) == ROOT:  # a run's output folder: model/, model-tiny/, ...
            skipped |= {
                n for n in names if (ROOT / n / "log.json").exists() or (ROOT / n / "last").is_dir()
            }
        return skipped

    shutil.copytree(ROOT, destination, ignore=ignore)


def fork_with_example(name, folder, packed=False):
    """A copy of the repository with the example's pair over modeling.py / dataset.py and the first
    rows of its data in train / valid files; returns it and the options that train on them. The
    causal LM's texts are packed only if `packed` (else one example a text)."""
    spec = EXAMPLES[name]
    repo = folder / "repo"
    copy_repository(repo)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(repo / "examples" / name / user_file, repo / user_file)
    if name == "causal_lm" and not packed:  # one example a text: what these tests count on
        source = (repo / "dataset.py").read_text()
        assert source.count("PACK = True") == 1
        (repo / "dataset.py").write_text(source.replace("PACK = True", "PACK = False"))
    for split, rows in [("train", TRAIN_ROWS), ("valid", VALID_ROWS)]:
        lines = (
            (repo / "examples" / name / "data" / f"{split}{spec['suffix']}")
            .read_text()
            .splitlines()[:rows]
        )
        (repo / f"{split}{spec['suffix']}").write_text("\n".join(lines) + "\n")
    options = [
        "--model_name_or_path",
        spec["model"],
        "--train_file",
        f"train{spec['suffix']}",
        "--valid_file",
        f"valid{spec['suffix']}",
        "--epochs",
        2,
        "--batch_size",
        BATCH_SIZE,
        "--lr",
        3e-3,
        "--num_warmup_steps",
        3,
    ]
    return repo, options


@pytest.fixture(scope="module", params=list(EXAMPLES))
def example(request, tmp_path_factory):
    """Runs train.py three times on an example: 2 epochs uninterrupted (printing samples every 10
    steps), and the same stopped after step 13, then resumed."""
    name = request.param
    repo, options = fork_with_example(name, tmp_path_factory.mktemp(name))

    def run(*extra, cache):  # each its own datasets cache: the first two run at the same time
        return launch(*options, *extra, cwd=repo, env={"HF_DATASETS_CACHE": str(repo / cache)})

    with ThreadPoolExecutor(2) as pool:  # two single-process runs on two cores
        full = pool.submit(run, "--outdir", "full", "--sample_every", 10, cache="cache-full")
        stopped = pool.submit(
            run, "--outdir", "stopped", "--stop_after_steps", STOP_AFTER, cache="cache-stopped"
        )
        full, stopped = full.result(), stopped.result()
    resumed = launch(
        "--resume", "stopped/last", cwd=repo, env={"HF_DATASETS_CACHE": str(repo / "cache-stopped")}
    )
    return SimpleNamespace(
        name=name, spec=EXAMPLES[name], repo=repo, full=full, stopped=stopped, resumed=resumed
    )


def recompute(name, repo, checkpoint):
    """The example's metrics over the whole validation file, from a checkpoint, in this process and
    in batches of 7 (not the runs' 16): what log.json holds must not depend on how it was
    gathered."""
    modeling = load_module(repo / "modeling.py", f"{name}_modeling")
    dataset = load_module(repo / "dataset.py", f"{name}_dataset")
    model = modeling.Model.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    args = SimpleNamespace(max_len=128, dataset_config=None, model_name_or_path=str(checkpoint))
    labels = (
        None
        if name == "causal_lm"
        else [model.config.id2label[i] for i in range(model.config.num_labels)]
    )
    valid_set = dataset.generate_dataset(
        str(repo / f"valid{EXAMPLES[name]['suffix']}"), "validation", tokenizer, args, labels
    )
    assert len(valid_set) == VALID_ROWS
    gathered, predictions = {}, []
    with torch.no_grad():
        for start in range(0, len(valid_set), 7):
            batch = valid_set.collate(
                valid_set.__getitems__(list(range(start, min(start + 7, len(valid_set)))))
            )
            outputs = model(**batch)
            for key, value in modeling.metric_inputs(model, tokenizer, batch, outputs).items():
                gathered.setdefault(key, []).append(value)
            predictions += modeling.predictions(model, tokenizer, batch, outputs)
    return (
        modeling.compute_metrics({k: torch.cat(v) for k, v in gathered.items()}),
        predictions,
        model,
    )


def best_epoch_log(outdir):
    state = read_json(Path(outdir) / "best" / "trainer_state.json")
    return state["log"][f"Epoch {state['epoch'] - 1}"]["valid_log"]


# ---------------------------------------------------------------- end to end, through train.py


@pytest.mark.slow  # 3 launches per example
def test_stopped_and_resumed_run_ends_bitwise_equal(example):
    repo = example.repo
    assert (
        f"Stopped by --stop_after_steps after {STOP_AFTER} optimizer steps"
        in example.stopped.stdout
    )
    assert read_json(repo / "stopped" / "last" / "trainer_state.json")["global_step"] == 20
    assert_bitwise_equal(repo / "full" / "last", repo / "stopped" / "last")
    assert_bitwise_equal(repo / "full" / "best", repo / "stopped" / "best")
    assert read_log(repo / "full" / "log.json") == read_log(repo / "stopped" / "log.json")


@pytest.mark.slow  # 3 launches per example
def test_log_has_the_metric_and_the_model_learns(example):
    log = read_log(example.repo / "full" / "log.json")
    assert list(epochs(log)) == ["Epoch 0", "Epoch 1"]
    valid = [log[f"Epoch {i}"]["valid_log"] for i in range(2)]
    for entry in valid:
        assert example.spec["metric"] in entry and all(math.isfinite(v) for v in entry.values())
    assert valid[1]["loss"] < valid[0]["loss"]
    if example.name == "causal_lm":
        assert set(valid[1]) == {"loss", "perplexity"}
        vocabulary = len(AutoTokenizer.from_pretrained(example.repo / example.spec["model"]))
        assert (
            1 < valid[1]["perplexity"] < valid[0]["perplexity"] < vocabulary
        )  # better than a uniform guess
    else:
        assert set(valid[1]) == {"loss", "accuracy", "precision", "recall", "f1", "macro_f1"}
        assert all(0 <= v <= 1 for k, v in valid[1].items() if k != "loss")
        assert valid[1]["f1"] > valid[0]["f1"] and valid[1]["accuracy"] > 0.8


@pytest.mark.slow  # 3 launches per example
def test_best_loads_with_from_pretrained_and_reproduces_its_metric(example):
    best = example.repo / "full" / "best"
    metrics, predictions, model = recompute(example.name, example.repo, best)
    logged = best_epoch_log(example.repo / "full")
    metric = example.spec["metric"]
    assert metrics[metric] == pytest.approx(logged[metric], rel=1e-5)
    assert len(predictions) == VALID_ROWS
    if example.name == "causal_lm":
        assert type(model).__name__ == "GPT2LMHeadModel"
        assert all(p["tokens"] > 0 and p["perplexity"] >= 1 for p in predictions)
        # exp(the token-weighted mean loss) is near exp(the batch-weighted mean loss train.py logs)
        assert math.log(metrics["perplexity"]) == pytest.approx(logged["loss"], rel=0.05)
    else:
        assert model.config.id2label == dict(enumerate(TAGS))  # the tag names survive save and load
        rows = [
            json.loads(line) for line in (example.repo / "valid.jsonl").read_text().splitlines()
        ]
        assert [len(p["tags"]) for p in predictions] == [
            len(row["tokens"]) for row in rows
        ]  # a tag per word
        assert all(tag in TAGS for p in predictions for tag in p["tags"])


@pytest.mark.slow  # 3 launches per example
def test_samples_show_generations_or_entities(example):
    out = example.full.stdout
    assert out.count("--- samples at step ") == 2  # steps 10 and 20
    if example.name == "causal_lm":
        assert (
            out.count("prompt: ") == 6
            and out.count("  generated:") == 6
            and out.count("  gold:") == 6
        )
    else:
        sentences = {
            " ".join(json.loads(line)["tokens"])
            for line in (example.repo / "train.jsonl").read_text().splitlines()
        }
        gold = [
            line.split("gold:", 1)[1] for line in out.splitlines() if line.startswith("  gold:")
        ]
        assert len(gold) == 6
        for (
            line
        ) in gold:  # the words, joined back from their sub-tokens, are those of a training sentence
            assert " ".join(word.split("/")[0] for word in line.split()) in sentences


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_two_processes_gather_the_whole_validation_set(name, tmp_path):
    """40 validation rows at 16 per process: the last batch is padded across the processes, and
    gather_for_metrics must drop exactly the padding for the metric to match a one-process count."""
    repo, options = fork_with_example(name, tmp_path)
    launch(*options, "--epochs", 1, "--outdir", "model", cwd=repo, processes=2)
    assert read_json(repo / "model" / "last" / "trainer_state.json")["num_processes"] == 2
    metrics, _, _ = recompute(name, repo, repo / "model" / "best")
    logged = best_epoch_log(repo / "model")
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key


# ---------------------------------------------------------------- the metrics alone


def test_perplexity_of_a_uniform_guess_is_the_vocabulary_size_and_skips_padding():
    modeling = load_module(ROOT / "examples" / "causal_lm" / "modeling.py", "causal_lm_modeling")
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])  # the second text is padded
    outputs = SimpleNamespace(logits=torch.zeros(2, 4, 50))
    inputs = modeling.metric_inputs(None, None, {"labels": labels}, outputs)
    assert inputs["tokens"].tolist() == [3, 1]
    assert modeling.compute_metrics(inputs)["perplexity"] == pytest.approx(50, rel=1e-5)
    assert [p["tokens"] for p in modeling.predictions(None, None, {"labels": labels}, outputs)] == [
        3,
        1,
    ]


def test_entities_and_f1_count_like_seqeval():
    modeling = load_module(
        ROOT / "examples" / "token_classification" / "modeling.py", "token_classification_modeling"
    )
    dataset = load_module(
        ROOT / "examples" / "token_classification" / "dataset.py", "token_classification_dataset"
    )
    assert dataset.tag_names({"PER", "ORG", "LOC"}) == TAGS
    ids = {tag: i for i, tag in enumerate(TAGS)}

    def entities(*tags):
        return modeling.entities([ids[t] for t in tags])

    loc, org, per = 0, 1, 2
    assert entities("B-PER", "I-PER", "O", "B-LOC") == {(0, 2, per), (3, 4, loc)}
    assert entities("I-PER", "I-PER", "B-PER") == {
        (0, 2, per),
        (2, 3, per),
    }  # an I after O begins one
    assert entities("B-PER", "I-LOC", "I-LOC", "B-ORG") == {(0, 1, per), (1, 3, loc), (3, 4, org)}
    assert entities("O", "O") == set() and entities() == set()

    # One sentence of 4 words, 3 of them split in sub-tokens (-100); gold PER(0-2) LOC(3), predicted
    # PER(0-1) LOC(3): one entity right of two, one word wrong of four. Sub-token predictions do not
    # count.
    labels = torch.tensor([[-100, ids["B-PER"], -100, ids["I-PER"], ids["O"], ids["B-LOC"], -100]])
    predicted = [
        ids["B-ORG"],
        ids["B-PER"],
        ids["B-ORG"],
        ids["O"],
        ids["O"],
        ids["B-LOC"],
        ids["B-ORG"],
    ]
    logits = torch.nn.functional.one_hot(torch.tensor([predicted]), len(TAGS)).float()
    gathered = modeling.metric_inputs(
        None, None, {"labels": labels}, SimpleNamespace(logits=logits)
    )
    assert gathered["entity_counts"].shape == (
        1,
        3,
        3,
    )  # fixed size per sentence: gathers across processes
    metrics = modeling.compute_metrics(gathered)
    assert metrics == pytest.approx(
        {"accuracy": 0.75, "precision": 0.5, "recall": 0.5, "f1": 0.5, "macro_f1": 0.5}
    )  # PER 0, LOC 1; ORG never seen: left out


# ---------------------------------------------------------------- the data alone


def example_args(name, **options):
    return SimpleNamespace(
        max_len=128, dataset_config=None, model_name_or_path=EXAMPLES[name]["model"], **options
    )


def test_causal_lm_keeps_blank_lines_for_predict_and_skips_them_in_training(tmp_path):
    dataset = load_module(ROOT / "examples" / "causal_lm" / "dataset.py", "causal_lm_dataset")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / EXAMPLES["causal_lm"]["model"])
    path = tmp_path / "texts.txt"
    path.write_text("after friday comes saturday\n\n   \ncount one two three\n")
    training = dataset.generate_dataset(str(path), "train", tokenizer, example_args("causal_lm"))
    predicting = dataset.generate_dataset(
        str(path), "validation", tokenizer, example_args("causal_lm"), predicting=True
    )
    assert len(predicting) == 4  # predict.py: one output line per input row
    assert predicting[1]["input_ids"] == [tokenizer.eos_token_id]
    # Packed: the two texts end to end, each with its end-of-text token, in one (short) block.
    assert len(training) == 1
    assert training[0]["input_ids"] == predicting[0]["input_ids"] + predicting[3]["input_ids"]
    dataset.PACK = False  # one example a text
    training = dataset.generate_dataset(str(path), "train", tokenizer, example_args("causal_lm"))
    assert len(training) == 2 and predicting[3] == training[1]
    path.write_text("\n  \n")
    with pytest.raises(SystemExit, match="every text in it is blank"):
        dataset.generate_dataset(str(path), "train", tokenizer, example_args("causal_lm"))


def test_token_classification_refuses_a_word_without_tokens(tmp_path):
    dataset = load_module(
        ROOT / "examples" / "token_classification" / "dataset.py", "token_classification_dataset"
    )
    tokenizer = AutoTokenizer.from_pretrained(ROOT / EXAMPLES["token_classification"]["model"])
    path = tmp_path / "rows.jsonl"
    rows = [
        {"tokens": ["Anna", "flew", "home"], "tags": ["B-PER", "O", "O"]},
        {"tokens": ["Anna", "\u200b", "Lopez"], "tags": ["B-PER", "O", "I-PER"]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        SystemExit, match=r"rows.jsonl, line 2: word 2 \('\\u200b'\) gives no token"
    ):
        dataset.generate_dataset(
            str(path), "train", tokenizer, example_args("token_classification")
        )


@pytest.mark.slow
def test_packed_causal_lm_blocks_resume_bitwise_and_predict_keeps_a_line_a_row(tmp_path):
    """The shipped causal LM packs its texts into --max_len blocks (no padding but the last block):
    a --max_steps run stopped mid-epoch and resumed ends bitwise the uninterrupted one, and
    predict.py still writes one line per input row."""
    repo, options = fork_with_example("causal_lm", tmp_path, packed=True)
    options = [*options, "--max_len", 16, "--max_steps", 25, "--eval_steps", 10]
    launch(*options, "--outdir", "full", cwd=repo)
    launch(*options, "--outdir", "stopped", "--stop_after_steps", 13, cwd=repo)
    launch("--resume", "stopped/last", cwd=repo)
    for name in ("last", "best"):
        assert_bitwise_equal(repo / "full" / name, repo / "stopped" / name)
    assert read_log(repo / "full" / "log.json") == read_log(repo / "stopped" / "log.json")
    state = read_json(repo / "full" / "last" / "trainer_state.json")
    assert state["global_step"] == 25 and state["data"]["train"]["rows"] < TRAIN_ROWS  # blocks
    launch(
        "--checkpoint", "full/best", "--input_file", "valid.txt", "--output_file", "out.jsonl",
        cwd=repo, script="predict.py",
    )  # fmt: skip
    assert len((repo / "out.jsonl").read_text().splitlines()) == VALID_ROWS
