"""examples/question_answering (SQuAD-style extractive QA, a question's context cut into windows):
its windows, SQuAD's scoring and the per-question metric, and end to end.

The windows and the metric in this process, and end to end in a copy of the repository with the pair
copied over modeling.py and dataset.py: bitwise resume, two processes (a question's windows split
between them), predict.py (one line per question), --sample_every.

    python -m pytest -q tests/template/test_example_qa.py            # windows, metric, data
    python -m pytest -q -m slow tests/template/test_example_qa.py    # end to end (~1-2 min)
"""

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from test_examples import copy_repository, load_module
from transformers import AutoTokenizer

from conftest import ROOT, assert_bitwise_equal, launch, read_json, read_log

EXAMPLE = ROOT / "examples" / "question_answering"
MODEL = "examples/question_answering/tiny-bert-qa"
MAX_LEN = 56  # train.yaml's
modeling = load_module(EXAMPLE / "modeling.py", "qa_modeling")
dataset = load_module(EXAMPLE / "dataset.py", "qa_dataset")
# 240 questions give 675 windows (the examples train.py counts): 43 optimizer steps an epoch at 16
TRAIN_ROWS, VALID_ROWS, BATCH_SIZE, EPOCHS, STEPS_PER_EPOCH = 240, 40, 16, 2, 43
STOP_AFTER = 60  # inside the second epoch


def args(**options):
    return SimpleNamespace(
        **{"max_len": MAX_LEN, "dataset_config": None, "model_name_or_path": MODEL, **options}
    )


def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / MODEL)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def windows_of(data):
    """{row: [its windows, in order]} of a dataset."""
    rows = {}
    for i in range(len(data)):
        rows.setdefault(data[i]["row"], []).append(data[i])
    return rows


ROW = {
    "context": "Ada was born in 1872. The capital of Norland is Velm.",
    "question": "What is the capital of Norland?",
    "answers": {"text": ["Velm"], "answer_start": [48]},
}


# ---------------------------------------------------------------- the windows


def test_windows_cover_the_context_with_doc_stride_overlap_and_answers_map_back():
    """Over the whole validation file: each question's windows follow one another in the dataset,
    hold its question whole and cut its context (tokenized alone) into runs that overlap by
    DOC_STRIDE tokens from the first token to the last; a window that holds the gold answer whole
    points at tokens whose offsets give back exactly its text, any other window at [CLS]."""
    tok = tokenizer()
    path = EXAMPLE / "data" / "valid.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    data = dataset.generate_dataset(str(path), "validation", tok, args())
    assert [data[i]["row"] for i in range(len(data))] == sorted(
        data[i]["row"] for i in range(len(data))
    )  # a question's windows are consecutive: predict.py groups them
    grouped = windows_of(data)
    assert list(grouped) == list(range(len(rows)))
    counts, beyond_first = [], 0
    for number, windows in grouped.items():
        row = rows[number]
        context = tok(row["context"], add_special_tokens=False, return_offsets_mapping=True)
        question = tok(row["question"], add_special_tokens=False).input_ids
        gold, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        begin, holding = 0, 0
        for window in windows:
            ids, offsets = window["input_ids"], window["offsets"]
            assert len(ids) <= MAX_LEN and len(offsets) == len(ids)
            assert ids[: len(question) + 2] == [tok.cls_token_id, *question, tok.sep_token_id]
            inside = [t for t, span in enumerate(offsets) if span is not None]
            assert inside == list(range(len(question) + 2, len(ids) - 1))  # only context tokens
            assert window["token_type_ids"] == [0] * (len(question) + 2) + [1] * (len(inside) + 1)
            # this window's run of the context's own tokens
            span = slice(begin, begin + len(inside))
            assert [ids[t] for t in inside] == context.input_ids[span]
            assert [tuple(offsets[t]) for t in inside] == context.offset_mapping[span]
            assert (window["context"], window["question"]) == (row["context"], row["question"])
            assert window["answers"] == row["answers"]["text"]
            first, last = window["start_positions"], window["end_positions"]
            if offsets[inside[0]][0] <= start and start + len(gold) <= offsets[inside[-1]][1]:
                assert (
                    0 < first <= last
                    and row["context"][offsets[first][0] : offsets[last][1]] == gold
                )
                holding += 1
            else:
                assert first == last == 0  # [CLS]: not in this window
            begin += len(inside) - dataset.DOC_STRIDE  # the next window shares DOC_STRIDE tokens
        assert begin + dataset.DOC_STRIDE == len(context.input_ids)  # the last reached the end
        assert holding >= 1  # answers are shorter than DOC_STRIDE: always whole somewhere
        counts.append(len(windows))
        beyond_first += windows[0]["start_positions"] == 0
    # The data is what the README says: 2 to 4 windows a question, many answers not in the first.
    assert set(counts) <= {2, 3, 4} and len(set(counts)) == 3
    assert beyond_first > len(rows) / 3


def test_predict_mode_needs_no_answers_and_several_gold_answers_are_kept(tmp_path):
    tok = tokenizer()
    rows = [dict(ROW, answers={"text": ["Velm", "is Velm"], "answer_start": [48, 45]})]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    (window,) = dataset.generate_dataset(path, "train", tok, args())
    assert window["answers"] == ["Velm", "is Velm"]  # all of them, for the metric
    assert window["context"][window["offsets"][window["start_positions"]][0] :].startswith("Velm")
    # A question without answers: predict.py only.
    path = write_rows(tmp_path / "questions.jsonl", [{k: ROW[k] for k in ("context", "question")}])
    (window,) = dataset.generate_dataset(path, "validation", tok, args(), predicting=True)
    assert "start_positions" not in window and window["answers"] == [] and window["row"] == 0
    with pytest.raises(SystemExit, match=r"questions.jsonl: no 'answers' column"):
        dataset.generate_dataset(path, "train", tok, args())


def test_collate_pads_the_tensors_and_keeps_the_other_values_as_lists(tmp_path):
    tok = tokenizer()
    rows = [ROW, dict(ROW, question="Which city is the capital of Norland ?")]
    data = dataset.generate_dataset(write_rows(tmp_path / "rows.jsonl", rows), "train", tok, args())
    samples = data.__getitems__([0, 1])
    short, long = (len(s["input_ids"]) for s in samples)
    assert short < long
    batch = data.collate(samples)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.is_tensor(batch[key]) and batch[key].shape == (2, long)
    assert batch["input_ids"][0, short:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [short, long]
    assert batch["token_type_ids"][0, short:].eq(0).all()
    assert batch["start_positions"].tolist() == [s["start_positions"] for s in samples]
    for key in dataset.ALONG:  # what the hooks read: plain lists, one value per window
        assert type(batch[key]) is list and batch[key] == [s[key] for s in samples], key
    assert batch["row"] == [0, 1] and batch["offsets"][0][0] is None


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "Who?", "answers": ROW["answers"]},
         r"line 2: the 'context' field is missing"),
        (dict(ROW, question="  "), r"line 2: the 'question' field is empty"),
        (dict(ROW, answers={"text": ["Velm"], "answer_start": [47]}),
         r"line 2: answer 1 \('Velm'\) is not at answer_start 47 of the context \(found ' Vel'"),
        (dict(ROW, answers={"text": ["Velm", "Norland"], "answer_start": [48]}),
         r"line 2: 2 answer texts but 1 answer_start"),
        (dict(ROW, answers={"text": [], "answer_start": []}),
         r"line 2: the 'answers' field needs a non-empty list 'text'"),
        (dict(ROW, question="What " * 40 + "?"),
         r"line 2: the question is 41 tokens, too long for --max_len 56"),
    ],
)  # fmt: skip
def test_a_bad_row_is_one_line_naming_the_file_and_the_row(tmp_path, row, message):
    path = write_rows(tmp_path / "rows.jsonl", [ROW, row])
    with pytest.raises(SystemExit, match=message) as error:
        dataset.generate_dataset(path, "train", tokenizer(), args())
    assert str(error.value.code).startswith("error: ") and "\n" not in str(error.value.code)
    assert "rows.jsonl, line 2" in str(error.value.code)


# ---------------------------------------------------------------- SQuAD's scoring


def test_squad_normalisation_exact_match_and_f1_by_hand():
    normalize, exact, f1 = modeling.normalize_answer, modeling.exact_match_score, modeling.f1_score
    assert normalize("The  Lism Sea!") == "lism sea"
    assert normalize("An apple, a theatre.") == "apple theatre"  # whole words only
    assert normalize("1,872") == "1872"
    assert exact("the Lism Sea", "Lism  sea.") == 1.0 and exact("Lism", "Lism Sea") == 0.0
    # predicted "lism sea north" vs gold "lism sea": P 2/3, R 1, F1 = 2PR / (P + R) = 0.8
    assert f1("Lism Sea north", "the Lism Sea") == pytest.approx(0.8)
    # a bag of words: "red red" shares one "red" with "red and green" ("and" is no article)
    assert f1("red red", "red and green") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert f1("the", "a") == 0.0 and f1("", "Velm") == 0.0  # nothing left: no credit
    best = modeling.best_over_golds
    assert best(f1, "1872", ["in 1872", "1872"]) == 1.0
    assert best(f1, "born in 1872", ["1872", "in 1872"]) == pytest.approx(0.8)
    assert best(exact, "Velm", []) == 0.0


def gathered(rows, scores, f1s, exacts):
    return {
        "row": torch.tensor(rows),
        "score": torch.tensor(scores),
        "f1": torch.tensor(f1s),
        "exact": torch.tensor(exacts),
    }


def test_compute_metrics_takes_per_question_the_best_scoring_window_in_any_order():
    """Question 0: three windows, the right answer in the best-scoring one; question 1: the best
    window is wrong (a better one scores lower); question 2: one window, half right; question 3:
    two windows that tie, the figure takes the lower F1 whatever their order."""
    windows = [
        (0, 2.0, 0.0, 0.0), (0, 9.5, 1.0, 1.0), (0, -1.0, 0.5, 0.0),
        (1, 7.0, 0.0, 0.0), (1, 3.0, 1.0, 1.0),
        (2, 1.0, 0.5, 0.0),
        (3, 4.0, 1.0, 1.0), (3, 4.0, 0.25, 0.0),
    ]  # fmt: skip
    expected = {"exact_match": 100 * 1 / 4, "f1": 100 * (1 + 0 + 0.5 + 0.25) / 4}
    rng = random.Random(0)
    for _ in range(20):  # as windows arrive from processes and batches in any order
        rng.shuffle(windows)
        assert modeling.compute_metrics(gathered(*zip(*windows))) == pytest.approx(expected)


def window_batch(rows, tmp_path):
    data = dataset.generate_dataset(
        write_rows(tmp_path / "rows.jsonl", rows), "train", tokenizer(), args()
    )
    return data.collate(data.__getitems__(list(range(len(data)))))


def test_metric_inputs_read_the_best_span_of_the_context_back_to_its_text(tmp_path):
    """Logits that score [CLS] and the question highest, and an end before the start or a span
    longer than MAX_ANSWER_TOKENS above the right one: only spans inside the context, start <= end,
    at most MAX_ANSWER_TOKENS long count, and their text is cut from the context by the offsets."""
    other = dict(ROW, question="When was Ada born?",
                 answers={"text": ["1872", "in 1872"], "answer_start": [16, 13]})  # fmt: skip
    batch = window_batch([ROW, other], tmp_path)
    offsets = batch["offsets"]

    def tokens(window, first, last):  # the context tokens of characters [first, last)
        return [t for t, span in enumerate(offsets[window]) if span and first <= span[0] < last]

    start, end = torch.zeros(2, len(offsets[0])), torch.zeros(2, len(offsets[0]))
    start[:, :2], end[:, :2] = 50, 50  # [CLS] and the question's first token: not answers
    velm = tokens(0, 48, 52)  # "Velm": "vel ##m"
    start[0, velm[0]], end[0, velm[-1]] = 10, 4
    end[0, velm[0] - 2] = 10  # an end before that start: 20 as a pair, but no span
    born, year = tokens(1, 7, 12), tokens(1, 16, 20)
    start[1, born[0]], end[1, year[-1]] = 3, 3  # "born in 1872"
    context = tokens(1, 0, 99)
    end[1, context[-1]] = 3.5  # from "born", too long a span
    assert context[-1] - born[0] >= modeling.MAX_ANSWER_TOKENS
    outputs = SimpleNamespace(start_logits=start, end_logits=end)
    texts, scores = modeling.read_answers(batch, outputs)
    assert texts == ["Velm", "born in 1872"] and scores.tolist() == [14, 6]
    values = modeling.metric_inputs(None, None, batch, outputs)
    assert values["row"].tolist() == [0, 1] and values["score"].tolist() == [14, 6]
    assert values["exact"].tolist() == [1, 0]
    assert values["f1"].tolist() == pytest.approx([1, 0.8])  # "born in 1872" vs "in 1872"
    predictions = modeling.predictions(None, None, batch, outputs)
    assert predictions == [
        {"answer": "Velm", "score": 14.0},
        {"answer": "born in 1872", "score": 6.0},
    ]
    assert modeling.merge_predictions(predictions[::-1]) == predictions[0]
    shown = modeling.format_samples(None, None, batch, outputs, 1)
    assert len(shown) == 1 and shown[0].startswith("question: What is the capital of Norland?")
    assert "prediction: 'Velm'" in shown[0] and "gold: 'Velm' (in this window)" in shown[0]


# ---------------------------------------------------------------- end to end, through train.py


def fork(folder):
    """A copy of the repository with the pair over modeling.py / dataset.py and the first rows of
    the example's data in train.jsonl / valid.jsonl; returns it and the options that train on
    them."""
    repo = folder / "repo"
    copy_repository(repo)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(EXAMPLE / user_file, repo / user_file)
    for split, rows in [("train", TRAIN_ROWS), ("valid", VALID_ROWS)]:
        lines = (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (repo / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    options = [
        "--config", f"{MODEL.rsplit('/', 1)[0]}/train.yaml",
        "--train_file", "train.jsonl", "--valid_file", "valid.jsonl",
        "--epochs", EPOCHS, "--batch_size", BATCH_SIZE, "--num_warmup_steps", 3,
    ]  # fmt: skip
    return repo, options


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train.py three times: uninterrupted (samples every 20 steps), and the same stopped after
    step 60, then resumed."""
    repo, options = fork(tmp_path_factory.mktemp("qa"))

    def run(*extra, cache):  # each its own datasets cache: the first two run at the same time
        return launch(*options, *extra, cwd=repo, env={"HF_DATASETS_CACHE": str(repo / cache)})

    with ThreadPoolExecutor(2) as pool:  # two single-process runs on two cores
        full = pool.submit(run, "--outdir", "full", "--sample_every", 20, cache="cache-full")
        stopped = pool.submit(
            run, "--outdir", "stopped", "--stop_after_steps", STOP_AFTER, cache="cache-stopped"
        )
        full, stopped = full.result(), stopped.result()
    resumed = launch(
        "--resume", "stopped/last", cwd=repo, env={"HF_DATASETS_CACHE": str(repo / "cache-stopped")}
    )
    return SimpleNamespace(repo=repo, full=full, stopped=stopped, resumed=resumed)


def recompute(repo, checkpoint):
    """EM and F1 over the validation file from a checkpoint, without train.py: windows in batches
    of 7 in this process, so a question's windows often fall in two batches."""
    model = modeling.Model.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    valid_set = dataset.generate_dataset(str(repo / "valid.jsonl"), "validation", tok, args())
    values = {}
    with torch.no_grad():
        for start in range(0, len(valid_set), 7):
            batch = valid_set.collate(
                valid_set.__getitems__(list(range(start, min(start + 7, len(valid_set)))))
            )
            tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            for key, value in modeling.metric_inputs(model, tok, batch, model(**tensors)).items():
                values.setdefault(key, []).append(value)
    gathered = {key: torch.cat(parts) for key, parts in values.items()}
    assert sorted(set(gathered["row"].tolist())) == list(range(VALID_ROWS))
    return modeling.compute_metrics(gathered)


def best_epoch_log(outdir):
    state = read_json(outdir / "best" / "trainer_state.json")
    return state["log"][f"Epoch {state['epoch'] - 1}"]["valid_log"]


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_bitwise_equal(runs):
    repo = runs.repo
    assert (
        f"Stopped by --stop_after_steps after {STOP_AFTER} optimizer steps" in runs.stopped.stdout
    )
    state = read_json(repo / "stopped" / "last" / "trainer_state.json")
    assert state["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert_bitwise_equal(repo / "full" / "last", repo / "stopped" / "last")
    assert_bitwise_equal(repo / "full" / "best", repo / "stopped" / "best")
    assert read_log(repo / "full" / "log.json") == read_log(repo / "stopped" / "log.json")


@pytest.mark.slow
def test_the_logged_metric_is_per_question_and_best_reproduces_it(runs):
    log = read_log(runs.repo / "full" / "log.json")
    valid = [log[f"Epoch {i}"]["valid_log"] for i in range(EPOCHS)]
    assert set(valid[0]) == {"loss", "exact_match", "f1"}
    assert all(0 <= v["exact_match"] <= v["f1"] <= 100 for v in valid)
    assert valid[-1]["loss"] < valid[0]["loss"]
    logged = best_epoch_log(runs.repo / "full")
    metrics = recompute(runs.repo, runs.repo / "full" / "best")
    assert metrics == pytest.approx({k: logged[k] for k in ("exact_match", "f1")}, rel=1e-6)
    # per question: EM is a multiple of 100 / 40 questions, not of 100 / the windows
    assert logged["exact_match"] * VALID_ROWS / 100 == pytest.approx(
        round(logged["exact_match"] * VALID_ROWS / 100)
    )


@pytest.mark.slow
def test_samples_show_question_prediction_and_gold(runs):
    out = runs.full.stdout
    assert out.count("--- samples at step ") == EPOCHS * STEPS_PER_EPOCH // 20
    questions = {
        json.loads(line)["question"]
        for line in (runs.repo / "train.jsonl").read_text().splitlines()
    }
    lines = out.splitlines()
    shown = [i for i, line in enumerate(lines) if line.startswith("question: ")]
    assert len(shown) == 3 * (EPOCHS * STEPS_PER_EPOCH // 20)
    for i in shown:
        assert lines[i].removeprefix("question: ") in questions
        assert lines[i + 1].startswith("  prediction: ") and lines[i + 2].startswith("  gold: ")


@pytest.mark.slow
def test_predict_writes_one_line_per_question(runs):
    repo = runs.repo
    rows = [json.loads(line) for line in (repo / "valid.jsonl").read_text().splitlines()]
    write_rows(repo / "questions.jsonl", [{k: r[k] for k in ("context", "question")} for r in rows])
    env = {"HF_DATASETS_CACHE": str(repo / "cache-full")}
    for name in ("questions", "valid"):  # without and with an answers column
        launch(
            "--checkpoint", "full/best", "--input_file", f"{name}.jsonl",
            "--output_file", f"{name}.out.jsonl", cwd=repo, env=env, script="predict.py",
        )  # fmt: skip
    lines = [json.loads(line) for line in (repo / "questions.out.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(VALID_ROWS))  # not one per window
    assert all(set(line) == {"index", "answer", "score"} for line in lines)
    assert all(line["answer"] in row["context"] for line, row in zip(lines, rows))
    assert (repo / "valid.out.jsonl").read_text() == (repo / "questions.out.jsonl").read_text()
    exact = [
        modeling.best_over_golds(modeling.exact_match_score, line["answer"], row["answers"]["text"])
        for line, row in zip(lines, rows)
    ]
    # the best-scoring window's answer, as the metric picks it
    assert 100 * sum(exact) / VALID_ROWS == pytest.approx(
        best_epoch_log(repo / "full")["exact_match"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "fsdp_cpu.yaml"], ids=["ddp", "fsdp2"])
def test_two_processes_score_each_question_once_over_its_windows(config, tmp_path):
    """A question's windows are split between the processes (and the last batches padded across
    them): the gathered metric must still be the one-process figure, per question; under FSDP2
    (sharded by BertLayer, as configs/accelerate/fsdp_cpu.yaml says) too, and best/ is whole."""
    repo, options = fork(tmp_path)
    windows = dataset.generate_dataset(str(repo / "valid.jsonl"), "validation", tokenizer(), args())
    rows = windows.rows["row"]  # batches of 16 go to the processes in turn
    assert any(rows[i] == rows[i - 1] for i in range(BATCH_SIZE, len(rows), BATCH_SIZE))
    launch(*options, "--epochs", 1, "--outdir", "model", cwd=repo, processes=2, config=config)
    state = read_json(repo / "model" / "last" / "trainer_state.json")
    assert (state["num_processes"], state["distributed_type"]) == (
        2,
        "FSDP" if config else "MULTI_CPU",
    )
    logged = best_epoch_log(repo / "model")
    metrics = recompute(repo, repo / "model" / "best")
    assert metrics == pytest.approx({k: logged[k] for k in ("exact_match", "f1")}, rel=1e-6)
