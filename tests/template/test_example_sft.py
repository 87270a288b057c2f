"""examples/sft (instruction tuning): its data and metric functions, and end to end.

Its data and metric functions in this process, and the pair copied over modeling.py / dataset.py in
a copy of the repository, trained end to end by the unchanged train.py: bitwise resume, metrics,
predict.py, LoRA on a trained checkpoint, --check.

    python -m pytest -q tests/template/test_example_sft.py            # the example's own functions
    python -m pytest -q -m slow tests/template/test_example_sft.py    # end to end (~1-2 min)
"""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_examples import copy_repository, load_module
from transformers import AutoTokenizer

from conftest import ROOT, assert_bitwise_equal, launch, read_json, read_log

EXAMPLE = ROOT / "examples" / "sft"
MODEL = EXAMPLE / "tiny-gpt2-chat"
TRAIN_ROWS, VALID_ROWS, BATCH_SIZE = 640, 40, 16  # 40 optimizer steps per epoch
STOP_AFTER = 53  # inside the second epoch, between two log windows


@pytest.fixture(scope="module")
def sft():
    return SimpleNamespace(
        dataset=load_module(EXAMPLE / "dataset.py", "sft_dataset"),
        modeling=load_module(EXAMPLE / "modeling.py", "sft_modeling"),
    )


def args(**options):
    return SimpleNamespace(
        **{
            "max_len": 128,
            "dataset_config": None,
            "model_name_or_path": str(MODEL),
            "train_split": "train",
            **options,
        }
    )


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


PAIRS = [
    {"prompt": "add three and four", "response": "seven"},
    {"prompt": "reverse the words: red fox cup", "response": "cup fox red"},
    {"prompt": "what comes after tuesday?", "response": "wednesday"},
]


# ---------------------------------------------------------------- the data alone


def test_labels_mask_exactly_the_prompt_and_the_padding(sft, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = sft.dataset.generate_dataset(
        write_rows(tmp_path / "pairs.jsonl", PAIRS), "train", tokenizer, args()
    )
    batch = data.collate(data.__getitems__([0, 1, 2]))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, pair in enumerate(PAIRS):
        ids, labels, mask = (
            batch["input_ids"][i],
            batch["labels"][i],
            batch["attention_mask"][i].bool(),
        )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": pair["prompt"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        answered = labels != -100
        assert (
            not answered[:prompt_length].any() and not answered[~mask].any()
        )  # the prompt and the padding
        assert answered[prompt_length : mask.sum()].all()
        assert labels[answered].equal(ids[answered])  # unshifted: the model shifts them itself
        assert tokenizer.decode(ids[:prompt_length]) == prompt
        assert (
            tokenizer.decode(ids[answered]) == pair["response"] + "<|end|>"
        )  # it learns to end its turn
    assert (
        sft.modeling.loss_items(batch).tolist() == (batch["labels"][:, 1:] != -100).sum(1).tolist()
    )


def test_the_chat_template_is_used_when_there_is_one_and_a_plain_format_otherwise(sft, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS[:1])
    with_template = sft.dataset.generate_dataset(path, "train", tokenizer, args())[0]
    assert (
        tokenizer.decode(with_template["input_ids"])
        == "<|user|>add three and four<|end|><|assistant|>seven<|end|>"
    )
    tokenizer.chat_template = None
    plain = sft.dataset.generate_dataset(path, "train", tokenizer, args())[0]
    text = tokenizer.decode(plain["input_ids"])
    assert text == sft.dataset.FALLBACK_FORMAT.format(prompt="add three and four") + "seven<|end|>"
    answered = [i for i, label in zip(plain["input_ids"], plain["labels"]) if label != -100]
    assert tokenizer.decode(answered) == "seven<|end|>"
    predicting = sft.dataset.generate_dataset(
        path, "validation", tokenizer, args(), predicting=True
    )[0]
    assert tokenizer.decode(predicting["input_ids"]) == text.removesuffix(
        "seven<|end|>"
    )  # the prompt alone


@pytest.mark.parametrize(
    "template, why",
    [
        ("{% for a in range(99999) %}{% for b in range(99999) %}{{ a }}{% endfor %}{% endfor %}",
         "ran over 2 s on one prompt"),
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}",
         "failed (SecurityError: access to attribute '__class__' of 'list' object is unsafe.)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("predicting", [False, True])
def test_a_chat_template_that_never_ends_or_probes_attributes_is_one_line(
    sft, tmp_path, template, why, predicting
):
    """A template that comes with a model folder or checkpoint: nested loops (hours) or an
    attribute probe end in one line naming its file, in training and in predict.py alike."""
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    (folder / "chat_template.jinja").write_text(template)
    tokenizer = sft.dataset.load_tokenizer(str(folder), args())
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    start = time.monotonic()
    with pytest.raises(SystemExit) as refused:
        sft.dataset.generate_dataset(path, "train", tokenizer, args(), predicting=predicting)
    assert str(refused.value.code) == (
        f"error: the chat template of {folder / 'chat_template.jinja'} {why}. Fix or remove that "
        f"template (without one, dataset.py's FALLBACK_FORMAT is used), or use another "
        f"--model_name_or_path."
    )
    assert time.monotonic() - start < 30


def test_predict_mode_gives_the_generation_prompt_and_needs_no_response(sft, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    data = sft.dataset.generate_dataset(path, "validation", tokenizer, args(), predicting=True)
    assert (
        tokenizer.decode(data[0]["input_ids"]) == "<|user|>add three and four<|end|><|assistant|>"
    )
    assert set(data.collate(data.__getitems__([0, 1]))) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [PAIRS[0], {"prompt": "spell cat"}],
            r"rows.jsonl, line 2: the 'response' field is missing",
        ),
        (
            [PAIRS[0], {"prompt": "  ", "response": "x"}],
            r"rows.jsonl, line 2: the 'prompt' field is empty",
        ),
        (
            [PAIRS[0], PAIRS[1], {"prompt": "spell cat", "response": ""}],
            r"rows.jsonl, line 3: the 'response' field is empty",
        ),
        (
            [{"prompt": "spell cat", "response": ["c", "a", "t"]}],
            r"rows.jsonl, line 1: the 'response' field is not a string",
        ),
        (
            [{"question": "spell cat", "response": "c a t"}],
            r"rows.jsonl: no 'prompt' column \(found: question, response\)",
        ),
    ],
)
def test_a_data_mistake_is_one_line_naming_the_file_and_the_row(sft, tmp_path, rows, message):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    with pytest.raises(SystemExit, match=message) as error:
        sft.dataset.generate_dataset(
            write_rows(tmp_path / "rows.jsonl", rows), "train", tokenizer, args()
        )
    assert "\n" not in str(error.value.code)


def test_a_prompt_with_no_room_for_the_response_and_a_tokenizer_without_eos_are_refused(
    sft, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    path = write_rows(tmp_path / "rows.jsonl", PAIRS)
    with pytest.raises(
        SystemExit, match=r"rows.jsonl, line 2: the prompt is 10 tokens .* --max_len 8"
    ):
        sft.dataset.generate_dataset(path, "train", tokenizer, args(max_len=8))
    tokenizer.pad_token = None  # no pad token: the eos token pads (masked by the attention mask)
    data = sft.dataset.generate_dataset(path, "train", tokenizer, args())
    assert data.collate(data.__getitems__([0, 1]))["input_ids"][0, -1] == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(SystemExit, match="has no end-of-text \\(eos\\) token"):
        sft.dataset.generate_dataset(path, "train", tokenizer, args())


def test_packing_keeps_the_examples_apart(sft, tmp_path, monkeypatch):
    """Packed rows: positions restart per example, every example starts on a prompt token (label
    -100), and each example's logits are those it has alone (attention does not cross)."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    rows = [
        dict(zip(("prompt", "response"), line))
        for line in [
            ("spell cat", "c a t"),
            ("add one and two", "three"),
            ("what comes before may?", "april"),
            ("reverse the words: sun moon", "moon sun"),
            ("spell frog", "f r o g"),
        ]
    ]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    plain = sft.dataset.generate_dataset(path, "train", tokenizer, args(max_len=40))
    monkeypatch.setattr(sft.dataset, "PACK", True)
    packed = sft.dataset.generate_dataset(path, "train", tokenizer, args(max_len=40))
    assert len(packed) < len(plain) and max(packed.lengths) <= 40
    assert sum(packed.lengths) == sum(plain.lengths)
    validation = sft.dataset.generate_dataset(path, "validation", tokenizer, args(max_len=40))
    assert len(validation) == len(plain)  # only the training set is packed: metrics are per example
    model = sft.modeling.build_model(str(MODEL), plain).eval()
    batch = packed.collate(packed.__getitems__(list(range(len(packed)))))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert (
        sft.modeling.loss_items(batch).sum()
        == sft.modeling.loss_items(plain.collate(list(plain))).sum()
    )
    with torch.no_grad():
        logits = model(**batch).logits
        example = 0
        for row, positions in enumerate(batch["position_ids"]):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                if example == len(plain):
                    break  # the padding at the end of the last row
                alone = plain[example]
                assert batch["labels"][row, start] == -100  # a prompt token: nothing predicts it
                assert batch["input_ids"][row, start:end].tolist() == alone["input_ids"]
                assert batch["labels"][row, start:end].tolist() == alone["labels"]
                own = model(input_ids=torch.tensor([alone["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[row, start:end], own, atol=1e-5, rtol=0)
                example += 1
    assert example == len(plain)


# ---------------------------------------------------------------- generation and the metric


def test_generation_in_a_left_padded_batch_equals_one_prompt_at_a_time(sft, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = sft.dataset.generate_dataset(
        write_rows(tmp_path / "pairs.jsonl", PAIRS), "train", tokenizer, args()
    )
    torch.manual_seed(0)
    model = sft.modeling.build_model(str(MODEL), data).eval()
    batch = data.collate(data.__getitems__([0, 1, 2]))
    prompts = [prompt for prompt, _ in sft.modeling.prompts_and_replies(batch)]
    assert len({len(p) for p in prompts}) > 1  # of different lengths: the batch is padded
    with torch.no_grad():
        together = sft.modeling.generate(model, tokenizer, prompts, 12)
        alone = [sft.modeling.generate(model, tokenizer, [p], 12)[0] for p in prompts]
    assert together == alone and all(len(reply) > 0 for reply in together)


# A generation_config.json beside a model's weights, as a hub model or an edited checkpoint may
# have: each setting would change what the "greedy" metric and predict.py see.
HOSTILE = {"num_beams": 3, "num_return_sequences": 2, "min_new_tokens": 10,
           "no_repeat_ngram_size": 1, "repetition_penalty": 5.0, "do_sample": True}  # fmt: skip


def test_generation_settings_of_the_model_folder_change_neither_metric_nor_predictions(
    sft, tmp_path
):
    """The same weights loaded from a folder whose generation_config.json asks for beams, several
    replies, a minimum length and penalties: exact_match's inputs and predict.py's replies are
    those of plain greedy decoding, one a prompt."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = sft.dataset.generate_dataset(
        write_rows(tmp_path / "pairs.jsonl", PAIRS), "train", tokenizer, args()
    )
    torch.manual_seed(0)
    model = sft.modeling.build_model(str(MODEL), data)
    plain, hostile = tmp_path / "plain", tmp_path / "hostile"
    model.save_pretrained(plain)
    model.save_pretrained(hostile)
    config = (
        read_json(hostile / "generation_config.json")
        if (hostile / "generation_config.json").exists()
        else {}
    )
    (hostile / "generation_config.json").write_text(json.dumps({**config, **HOSTILE}))
    batch = data.collate(data.__getitems__([0, 1, 2]))
    seen = {}
    for folder in (plain, hostile):
        loaded = type(model).from_pretrained(folder).eval()
        assert (loaded.generation_config.num_beams == 3) == (folder == hostile)
        with torch.no_grad():
            seen[folder.name] = (
                sft.modeling.metric_inputs(loaded, tokenizer, batch, None)["exact_match"].tolist(),
                sft.modeling.predictions(loaded, tokenizer, batch, None),
            )
        assert (loaded.generation_config.num_beams == 3) == (folder == hostile)  # restored
    assert seen["hostile"] == seen["plain"] and len(seen["plain"][1]) == 3


def test_exact_match_counts_replies_equal_to_the_gold_up_to_the_end_token(
    sft, tmp_path, monkeypatch
):
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    data = sft.dataset.generate_dataset(
        write_rows(tmp_path / "pairs.jsonl", PAIRS), "train", tokenizer, args()
    )
    batch = data.collate(data.__getitems__([0, 1, 2]))
    golds = [gold.tolist() for _, gold in sft.modeling.prompts_and_replies(batch)]
    end = tokenizer.eos_token_id
    assert all(gold[-1] == end for gold in golds)
    # Right; right but not ended where the gold ends; wrong.
    replies = [golds[0], golds[1][:-1] + [tokenizer.pad_token_id], golds[0]]
    monkeypatch.setattr(sft.modeling, "generate", lambda model, tokenizer, prompts, n: replies)
    gathered = sft.modeling.metric_inputs(None, tokenizer, batch, None)
    assert gathered["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert sft.modeling.compute_metrics(gathered) == {"exact_match": pytest.approx(1 / 3)}
    assert sft.modeling.until_end(torch.tensor([5, end, 7]), end) == [5, end]


# ---------------------------------------------------------------- end to end, through train.py


def fork_with_sft(folder):
    repo = folder / "repo"
    copy_repository(repo)
    for user_file in ("modeling.py", "dataset.py"):
        shutil.copy(EXAMPLE / user_file, repo / user_file)
    for split, rows in [("train", TRAIN_ROWS), ("valid", VALID_ROWS)]:
        lines = (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (repo / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    options = [
        "--model_name_or_path",
        "examples/sft/tiny-gpt2-chat",
        "--train_file",
        "train.jsonl",
        "--valid_file",
        "valid.jsonl",
        "--epochs",
        2,
        "--batch_size",
        BATCH_SIZE,
        "--lr",
        3e-3,
        "--num_warmup_steps",
        5,
        "--metric_for_best",
        "exact_match",
    ]
    return repo, options


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 epochs uninterrupted and stopped after step 53 then resumed, each with --accumulation 1 and
    2 (two single-process runs at a time on two cores)."""
    repo, options = fork_with_sft(tmp_path_factory.mktemp("sft"))

    def run(*extra, cache):  # each its own datasets cache: two run at the same time
        return launch(*options, *extra, cwd=repo, env={"HF_DATASETS_CACHE": str(repo / cache)})

    small = ["--batch_size", BATCH_SIZE // 2, "--accumulation", 2]
    with ThreadPoolExecutor(2) as pool:
        full = pool.submit(run, "--outdir", "full", "--sample_every", 20, cache="cache-a")
        stopped = pool.submit(
            run, "--outdir", "stopped", "--stop_after_steps", STOP_AFTER, cache="cache-b"
        )
        full, stopped = full.result(), stopped.result()
        resumed = pool.submit(
            launch,
            "--resume",
            "stopped/last",
            cwd=repo,
            env={"HF_DATASETS_CACHE": str(repo / "cache-b")},
        )
        accumulated = pool.submit(run, "--outdir", "full2", *small, cache="cache-a")
        resumed, accumulated = resumed.result(), accumulated.result()
        stopped2 = pool.submit(
            run, "--outdir", "stopped2", *small, "--stop_after_steps", STOP_AFTER, cache="cache-b"
        )
        lora = pool.submit(
            launch,
            *options,
            "--model_name_or_path",
            "full/best",
            "--epochs",
            1,
            "--lora_r",
            8,
            "--outdir",
            "lora",
            cwd=repo,
            env={"HF_DATASETS_CACHE": str(repo / "cache-a")},
        )
        stopped2, lora = stopped2.result(), lora.result()
        resumed2 = pool.submit(
            launch,
            "--resume",
            "stopped2/last",
            cwd=repo,
            env={"HF_DATASETS_CACHE": str(repo / "cache-b")},
        )
        check = pool.submit(
            launch,
            *options,
            "--check",
            cwd=repo,
            check=False,
            env={"HF_DATASETS_CACHE": str(repo / "cache-a")},
        )
        resumed2, check = resumed2.result(), check.result()
    return SimpleNamespace(
        repo=repo,
        options=options,
        full=full,
        stopped=stopped,
        resumed=resumed,
        lora=lora,
        check=check,
    )


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", "2"])  # --accumulation 1, and 2 batches of 8 a step
def test_stopped_and_resumed_runs_end_bitwise_equal(runs, suffix):
    repo = runs.repo
    assert read_json(repo / f"stopped{suffix}" / "last" / "trainer_state.json")["global_step"] == 80
    assert_bitwise_equal(repo / f"full{suffix}" / "last", repo / f"stopped{suffix}" / "last")
    assert_bitwise_equal(repo / f"full{suffix}" / "best", repo / f"stopped{suffix}" / "best")
    assert read_log(repo / f"full{suffix}" / "log.json") == read_log(
        repo / f"stopped{suffix}" / "log.json"
    )
    assert (
        f"Stopped by --stop_after_steps after {STOP_AFTER} optimizer steps" in runs.stopped.stdout
    )


@pytest.mark.slow
def test_log_has_exact_match_and_the_model_learns(runs):
    log = read_log(runs.repo / "full" / "log.json")
    valid = [log[f"Epoch {i}"]["valid_log"] for i in range(2)]
    assert all(set(entry) == {"loss", "exact_match"} for entry in valid)
    assert valid[1]["loss"] < valid[0]["loss"] and valid[1]["exact_match"] > valid[0]["exact_match"]
    assert "highest valid exact_match" in runs.full.stdout  # higher is better, said at the start
    out = runs.full.stdout
    assert (
        out.count("--- samples at step ") == 4
        and out.count("  generated:") == 12
        and out.count("  gold:") == 12
    )


@pytest.mark.slow
def test_predict_writes_one_generated_response_per_prompt(runs):
    repo = runs.repo
    prompts = [
        json.loads(line)["prompt"] for line in (repo / "valid.jsonl").read_text().splitlines()
    ]
    write_rows(repo / "prompts.jsonl", [{"prompt": p} for p in prompts])  # no response column
    launch(
        "--checkpoint",
        "full/best",
        "--input_file",
        "prompts.jsonl",
        "--output_file",
        "predictions.jsonl",
        "--batch_size",
        7,
        cwd=repo,
        script="predict.py",
        env={"HF_DATASETS_CACHE": str(repo / "cache-a")},
    )
    lines = [json.loads(line) for line in (repo / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(VALID_ROWS))
    assert all(
        set(line) == {"index", "response"} and isinstance(line["response"], str) for line in lines
    )
    gold = [
        json.loads(line)["response"] for line in (repo / "valid.jsonl").read_text().splitlines()
    ]
    right = sum(line["response"] == answer for line, answer in zip(lines, gold)) / VALID_ROWS
    logged = read_json(repo / "full" / "best" / "trainer_state.json")["best_metric"]
    assert right == pytest.approx(logged)  # predict.py's replies are the ones validation scored


@pytest.mark.slow
def test_lora_on_a_trained_checkpoint_trains_the_adapters_only(runs):
    repo = runs.repo
    base_loss = read_log(repo / "full" / "log.json")["Epoch 1"]["valid_log"][
        "loss"
    ]  # full/best's epoch
    assert read_json(repo / "full" / "best" / "trainer_state.json")["epoch"] == 2
    lora_loss = read_log(repo / "lora" / "log.json")["Epoch 0"]["valid_log"]["loss"]
    assert lora_loss < base_loss
    base, tuned = (
        load_file(repo / "full" / "best" / "model.safetensors"),
        load_file(repo / "lora" / "best" / "model.safetensors"),
    )
    assert base.keys() == tuned.keys() and all(
        base[k].equal(tuned[k]) for k in base
    )  # the backbone as it was
    adapters = load_file(repo / "lora" / "best" / "adapter_model.safetensors")
    assert adapters and all("lora_" in k for k in adapters)
    assert {k.split(".")[-3] for k in adapters} == {
        "c_attn",
        "c_proj",
        "c_fc",
    }  # every Conv1D of GPT-2 by default


@pytest.mark.slow
def test_check_passes(runs):
    out = runs.check.stdout
    assert runs.check.returncode == 0, out + runs.check.stderr
    assert "FAIL" not in out and "--check: every check passed" in out
    assert any(line.startswith("PASS  split") for line in out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_two_processes_generate_on_every_process_and_gather(runs, sharded, tmp_path):
    """One epoch from full/best on 2 processes, DDP or FSDP2 (sharded: every forward of generate()
    gathers the shards from both processes, and transformers keeps them stepping together until both
    are done), samples shown once: the exact match logged is predict.py's on the best/ it saved."""
    repo, outdir = runs.repo, tmp_path / "two"
    config = None
    if sharded:  # fsdp_cpu.yaml with GPT-2's block as the unit of sharding
        config = tmp_path / "fsdp_gpt2.yaml"
        config.write_text(
            (repo / "configs" / "accelerate" / "fsdp_cpu.yaml")
            .read_text()
            .replace(
                "fsdp_transformer_layer_cls_to_wrap: BertLayer",
                "fsdp_transformer_layer_cls_to_wrap: GPT2Block",
            )
        )
    result = launch(
        *runs.options,
        "--model_name_or_path",
        "full/best",
        "--epochs",
        1,
        "--lr",
        1e-3,
        "--outdir",
        outdir,
        "--sample_every",
        15,
        cwd=repo,
        processes=2,
        config=config,
        env={"HF_DATASETS_CACHE": str(repo / "cache-a")},
    )
    # Samples too: under FSDP2 every process generates them (the main one prints), else the main
    # one.
    assert (
        result.stdout.count("--- samples at step ") == 1
        and result.stdout.count("  generated:") == 3
    )
    state = read_json(outdir / "best" / "trainer_state.json")
    assert (state["num_processes"], state["distributed_type"]) == (
        2,
        "FSDP" if sharded else "MULTI_CPU",
    )
    launch(
        "--checkpoint",
        outdir / "best",
        "--input_file",
        "valid.jsonl",
        "--output_file",
        tmp_path / "p.jsonl",
        cwd=repo,
        script="predict.py",
        env={"HF_DATASETS_CACHE": str(repo / "cache-a")},
    )
    replies = [
        json.loads(line)["response"] for line in (tmp_path / "p.jsonl").read_text().splitlines()
    ]
    gold = [
        json.loads(line)["response"] for line in (repo / "valid.jsonl").read_text().splitlines()
    ]
    assert len(replies) == VALID_ROWS
    assert state["best_metric"] == pytest.approx(
        sum(r == g for r, g in zip(replies, gold)) / VALID_ROWS
    )
