"""The traps a new user hit: metric direction, a task without a tokenizer, a vocabulary for their own
words, a plain nn.Module, a loss that is not a scalar, messages, two runs in one outdir.

    pytest tests/template/test_traps.py
"""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

import dataset
import train
import utils
from conftest import TREE, data_args, read_json, tiny_tokenizer
from core import check, options

FAST = ["--batch_size", "32", "--epochs", "1"]


def run(tiny_data, tmp_path, *extra):
    train.main(
        [
            *map(str, data_args(tiny_data)),
            *FAST,
            "--outdir",
            str(tmp_path / "model"),
            *map(str, extra),
        ]
    )
    return tmp_path / "model"


def refused(argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in argv])
    message = str(exit_info.value.code)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- --metric_for_best


def test_an_unknown_metric_for_best_is_refused_before_the_first_step(
    tiny_data, tmp_path, monkeypatch
):
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))
    refused(
        [*data_args(tiny_data), *FAST, "--metric_for_best", "f1", "--outdir", tmp_path / "model"],
        "--metric_for_best f1: not among the validation metrics (loss, accuracy, macro_f1)",
    )
    assert not (tmp_path / "model").exists() and not steps  # nothing trained, nothing written


@pytest.mark.parametrize(
    "name, greater",
    [
        ("loss", False),
        ("mse", False),
        ("valid_rmse", False),
        ("word_error_rate", False),
        ("perplexity", False),
        ("accuracy", True),
        ("macro_f1", True),
    ],
)
def test_the_direction_of_a_metric_follows_its_name(
    name, greater, monkeypatch, tiny_data, tmp_path, capsys
):
    monkeypatch.setattr(
        train.modeling, "compute_metrics", lambda gathered: {name: 0.5} if name != "loss" else {}
    )
    args = options.parse_args([*map(str, data_args(tiny_data)), "--metric_for_best", name])
    model = train.build_model(
        args.model_name_or_path,
        train.generate_dataset(args.train_file, "train", tiny_tokenizer(), args),
    )
    valid_set = train.generate_dataset(
        args.valid_file, "validation", tiny_tokenizer(), args, ["negative", "neutral", "positive"]
    )
    train_set = train.generate_dataset(args.train_file, "train", tiny_tokenizer(), args)
    assert (
        check.first_batch(
            model,
            train_set,
            valid_set,
            args,
            lambda b, o: train.compute_metrics(train.metrics_of(model, None, b, o)),
        )
        is greater
    )
    args.greater_is_better = not greater  # the flag wins
    assert check.first_batch(
        model,
        train_set,
        valid_set,
        args,
        lambda b, o: train.compute_metrics(train.metrics_of(model, None, b, o)),
    ) is (not greater)


def test_mse_keeps_the_lowest_epoch_in_best(tiny_data, tmp_path, monkeypatch, capfd):
    """A made-up 'mse' that rises every epoch: best/ must stay at epoch 0 (it used to keep the worst)."""
    values = iter([0.1, 0.5, 0.9, 0.2, 0.3])
    monkeypatch.setattr(train.modeling, "compute_metrics", lambda gathered: {"mse": next(values)})
    outdir = run(tiny_data, tmp_path, "--metric_for_best", "mse", "--epochs", 3)
    assert "best/ keeps the epoch with the lowest valid mse" in capfd.readouterr().out
    # 0.1 is the one-batch check before training; then 0.5, 0.9, 0.2 for epochs 0, 1, 2
    state = read_json(outdir / "best" / "trainer_state.json")
    assert state["best_metric"] == 0.2 and state["epoch"] == 3
    assert read_json(outdir / "last" / "trainer_state.json")["bad_epochs"] == 0


# ---------------------------------------------------------------- a task without a tokenizer


class TableConfig(PretrainedConfig):
    model_type = "test-table-regressor"

    def __init__(self, features=3, **kwargs):
        self.features = features
        super().__init__(**kwargs)


@dataclass
class RegressionOutput(ModelOutput):
    loss: torch.Tensor | None = None
    prediction: torch.Tensor | None = None


class TableModel(PreTrainedModel):
    config_class = TableConfig

    def __init__(self, config):
        super().__init__(config)
        self.layer = nn.Linear(config.features, 1)
        self.post_init()

    def forward(self, x, y=None):
        prediction = self.layer(x).squeeze(-1)
        return RegressionOutput(
            loss=nn.functional.mse_loss(prediction, y) if y is not None else None,
            prediction=prediction,
        )


class TableDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
        self.labels = None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def collate(self, samples):
        return {
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.stack([s["y"] for s in samples]),
        }


@pytest.fixture
def table_task(monkeypatch):
    """A tabular regression pair as a user would write it: no tokenizer anywhere."""
    monkeypatch.delattr(dataset, "load_tokenizer")
    monkeypatch.setattr(
        train,
        "generate_dataset",
        lambda path, split, tokenizer, args, labels=None: TableDataset(
            256 if split == "train" else 64, seed=0 if split == "train" else 1
        ),
    )
    monkeypatch.setattr(train, "build_model", lambda name, train_set: TableModel(TableConfig()))
    monkeypatch.delattr(
        train.modeling, "metric_inputs"
    )  # optional: validation reports the loss only
    monkeypatch.delattr(train.modeling, "compute_metrics")


def test_a_task_without_a_tokenizer_trains_saves_and_resumes(table_task, tmp_path):
    outdir = tmp_path / "model"
    # The model folder is not even read by this task: a tokenizer is no longer loaded from it.
    args = [
        "--model_name_or_path",
        tmp_path / "nothing-here",
        "--batch_size",
        32,
        "--epochs",
        2,
        "--lr",
        0.05,
        "--outdir",
        outdir,
    ]
    train.main([*map(str, args), "--stop_after_steps", "12"])
    train.main(["--resume", str(outdir / "last")])
    files = {p.name for p in (outdir / "last").iterdir()}
    assert not any(name.startswith(("tokenizer", "vocab", "special_tokens")) for name in files)
    log = read_json(outdir / "log.json")
    assert log["Epoch 1"]["valid_log"]["loss"] < log["Epoch 0"]["valid_log"]["loss"]
    assert TableModel.from_pretrained(outdir / "best").layer.weight.shape == (1, 3)


# ---------------------------------------------------------------- a vocabulary learnt from the data


def test_training_from_scratch_learns_the_vocabulary_of_the_training_file(tmp_path):
    words = ["zebra", "quantum", "marmalade", "kayak", "obsidian"]
    train_file = tmp_path / "mine.jsonl"
    train_file.write_text(
        "".join(
            f'{{"text": "the {w} is {v}", "label": "{v}"}}\n'
            for w in words
            for v in ("good", "bad")
        )
    )
    args = options.parse_args(["--train_file", str(train_file)])
    tokenizer = dataset.load_tokenizer(TREE / "assets" / "tiny-bert", args)
    assert tokenizer.unk_token_id not in tokenizer("The ZEBRA and the kayak are good")["input_ids"]
    rows = utils.load_rows(train_file)
    cached = list(
        utils.Path(dataset.datasets.config.HF_DATASETS_CACHE, "vocabularies").glob(
            f"{rows._fingerprint}-*"
        )
    )
    assert len(cached) == 1  # cached ...
    cache = cached[0]
    before = cache.stat().st_mtime_ns
    assert (
        dataset.load_tokenizer(TREE / "assets" / "tiny-bert", args).get_vocab()
        == tokenizer.get_vocab()
    )
    assert cache.stat().st_mtime_ns == before  # ... and read back, not learnt again
    model = train.build_model(
        args.model_name_or_path, dataset.generate_dataset(str(train_file), "train", tokenizer, args)
    )
    assert model.config.encoder["vocab_size"] == len(tokenizer)
    # Learnt again in another process (tokenizers seeds its hash maps per process), into an empty cache:
    # the same file, byte for byte, so the same seed gives the same run on every machine.
    learn = (
        f"import sys; sys.path.insert(0, {str(TREE)!r}); import dataset; from core import options; "
        f"dataset.load_tokenizer({str(TREE / 'assets' / 'tiny-bert')!r}, options.parse_args(['--train_file', "
        f"{str(train_file)!r}]))"
    )
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "another-cache")}
    subprocess.run([sys.executable, "-c", learn], env=env, check=True, capture_output=True)
    assert (
        tmp_path / "another-cache" / "vocabularies" / cache.name
    ).read_bytes() == cache.read_bytes()


def test_a_vocabulary_of_many_characters_keeps_every_one(tmp_path):
    """8,100 distinct CJK characters (each a word of its own) and fullwidth punctuation: more than
    VOCABULARY_SIZE, and still none of them [UNK]."""
    characters = [chr(0x4E00 + i) for i in range(8100)]
    train_file = tmp_path / "cjk.jsonl"
    train_file.write_text(
        "".join(
            json.dumps(
                {"text": "".join(characters[k : k + 30]) + "，好！", "label": str(k % 2)},
                ensure_ascii=False,
            )
            + "\n"
            for k in range(0, 8100, 30)
        )
    )
    tokenizer = dataset.load_tokenizer(
        TREE / "assets" / "tiny-bert", options.parse_args(["--train_file", str(train_file)])
    )
    ids = tokenizer("".join(characters) + "，！", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8100 + 2 and tokenizer.unk_token_id not in ids


def test_the_checkpoint_carries_its_tokenizer_and_resume_uses_it(tiny_data, tmp_path):
    outdir = run(tiny_data, tmp_path)
    saved = dataset.load_tokenizer(
        outdir / "last", None
    )  # a checkpoint's own tokenizer, no data needed
    assert (
        saved.get_vocab()
        == dataset.load_tokenizer(
            TREE / "assets" / "tiny-bert", options.parse_args(list(map(str, data_args(tiny_data))))
        ).get_vocab()
    )


# ---------------------------------------------------------------- the model contract


def test_a_plain_nn_module_is_refused_before_the_first_step(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_model", lambda name, train_set: nn.Linear(2, 2))
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "build_model() in modeling.py returned a Linear, not a transformers PreTrainedModel",
        "Subclass PreTrainedModel",
    )
    assert not (tmp_path / "model").exists()


def test_a_loss_that_is_not_a_scalar_is_one_line(tiny_data, tmp_path, monkeypatch):
    build = train.build_model

    def per_example_loss(name, train_set):
        model = build(name, train_set)
        forward = model.forward
        model.forward = lambda **batch: RegressionOutput(
            loss=nn.functional.cross_entropy(
                forward(**batch).logits, batch["labels"], reduction="none"
            )
        )
        return model

    monkeypatch.setattr(train, "build_model", per_example_loss)
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "Model.forward() returned a loss of shape (3,): it must be a scalar tensor",
    )


def test_no_loss_says_which_keys_went_into_kwargs(tiny_data, tmp_path, monkeypatch):
    class Swallowing(nn.Module):
        def forward(self, target=None, **inputs):  # the batch has `labels`, so target stays None
            return ModelOutput(logits=torch.zeros(2, 3))

    class Model(TableModel):
        forward = Swallowing.forward

    monkeypatch.setattr(train, "build_model", lambda name, train_set: Model(TableConfig()))
    refused(
        [*data_args(tiny_data), *FAST, "--outdir", tmp_path / "model"],
        "returned no loss",
        "input_ids, labels, attention_mask are not parameters of forward() and went into its **inputs",
    )


# ---------------------------------------------------------------- messages


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "per process; reduce if out of memory (default: 32)" in text and "(default: linear)" in text
    )


def test_csv_errors_count_lines_the_same_way(tiny_data, tmp_path):
    """A CSV line with too many fields (the reader's error) and one with a missing label (ours): both
    say the line an editor shows, header included."""
    extra = tmp_path / "extra.csv"
    extra.write_text("text,label\nthe food was great,positive\nthe food,was,bad\n")
    refused(["--train_file", extra, "--outdir", tmp_path / "model"], "line 3")
    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\nthe food was great,positive\nno label here\n")
    refused(["--train_file", missing, "--outdir", tmp_path / "model"], "missing.csv, line 3:")


def test_accelerate_launch_quiet_shows_our_line_only(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "-q",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "train.py",
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--outdir",
            str(tmp_path / "model"),
        ],
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "missing.jsonl: no such data file" in result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr


# ---------------------------------------------------------------- one run per outdir

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from core import resume
resume.lock_outdir({outdir!r})
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_second_run_into_a_busy_outdir_is_refused_and_a_stale_lock_taken_over(
    extra, tiny_data, tmp_path
):
    outdir = tmp_path / "model"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(TREE), outdir=str(outdir))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(
            [*data_args(tiny_data), *FAST, "--outdir", outdir, *extra],
            f"--outdir {outdir} is in use by another run (pid {holder.pid} on ",
        )
    finally:
        holder.kill()
        holder.wait()
    assert (
        (outdir / ".lock").read_text().startswith(f"pid {holder.pid}")
    )  # left behind by the dead holder
    run(tiny_data, tmp_path, *extra)  # stale: taken over
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 1


# ---------------------------------------------------------------- the launcher signalled alone


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_the_launcher_alone_saves_and_stops_the_training_processes(
    processes, tiny_data, tmp_path
):
    """Schedulers and `kill PID` often signal only `accelerate launch`: its train.py processes must
    not train on orphaned, but save last/ and stop, printing a resume command that works as printed."""
    from test_faults import start, wait_for_checkpoint

    outdir = tmp_path / "model"
    process = start(tiny_data, outdir, processes, "--save_steps", 3, "--log_every", 1)
    wait_for_checkpoint(outdir, 3, process)
    process.send_signal(signal.SIGTERM)  # the launcher only, not its process group
    output, _ = process.communicate(
        timeout=120
    )  # EOF once every train.py holding the pipe has exited
    assert f"Stopped by signal {int(signal.SIGTERM)}" in output
    state = read_json(outdir / "last" / "trainer_state.json")
    assert (
        state["num_processes"] == processes and state["global_step"] < 40
    )  # stopped early, not trained on
    command = output.split("Continue with: ", 1)[1].splitlines()[0]
    expected = (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py"
        if processes == 2
        else "accelerate launch train.py"
    )
    assert command == f"{expected} --resume {outdir}/last"
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)
    resumed = subprocess.run(
        command, shell=True, cwd=TREE, env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(outdir / "last" / "trainer_state.json")["epoch"] == 2


# ---------------------------------------------------------------- every core


@pytest.mark.slow
@pytest.mark.parametrize("processes, chosen", [(1, None), (2, None), (1, "1")])
def test_every_core_under_accelerate_launch_unless_the_user_chose(processes, chosen, tmp_path):
    """accelerate launch gives each process one thread; train.py takes physical cores / processes."""
    import psutil

    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU")
    }
    if chosen:
        env["OMP_NUM_THREADS"] = chosen
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--main_process_port", "0"]
    result = subprocess.run(
        [
            *command,
            "train.py",
            "--train_file",
            str(tmp_path / "missing.jsonl"),
            "--outdir",
            str(tmp_path / "model"),
        ],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    cores = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
    expected = int(chosen) if chosen else max(1, cores // processes)
    assert f"{expected} CPU thread(s) per process" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )


def test_another_thread_count_on_resume_is_said(tiny_data, tmp_path):
    outdir = tmp_path / "model"
    train.main(
        [
            *map(str, data_args(tiny_data)),
            "--batch_size",
            "32",
            "--epochs",
            "2",
            "--outdir",
            str(outdir),
            "--stop_after_steps",
            "3",
        ]
    )
    state = read_json(outdir / "last" / "trainer_state.json")
    assert state["threads"] == 1  # the tests' one thread
    state["threads"] = 4
    (outdir / "last" / "trainer_state.json").write_text(json.dumps(state))
    manifest = read_json(outdir / "last" / "manifest.json")
    from core import checkpoint

    manifest["files"]["trainer_state.json"] = checkpoint.sha256(
        outdir / "last" / "trainer_state.json"
    )
    checkpoint.write_json(outdir / "last" / "manifest.json", manifest)
    from conftest import run as run_in_process

    result = run_in_process("--resume", outdir / "last")
    assert "changed on resume: 4 -> 1 CPU threads per process" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--check"]])
def test_max_len_beyond_the_models_positions_is_one_line_before_training(
    extra, tiny_data, tmp_path
):
    """The pinned pair wraps a BERT of 128 positions inside its own model: found there."""
    message = refused(
        [*data_args(tiny_data), "--max_len", 129, "--outdir", tmp_path / "model", *extra]
    )
    assert message == (
        "error: --max_len 129: the model of assets/tiny-bert has 128 positions, so a longer input would "
        "fail mid-run. Pass --max_len 128 or less."
    )
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "config, limit",
    [
        ({"model_type": "gpt2", "n_positions": 128}, 128),
        (
            {"model_type": "roberta", "max_position_embeddings": 514},
            512,
        ),  # 2 rows before the first position
        (
            {"model_type": "bart", "max_position_embeddings": 64},
            64,
        ),  # its table holds 66: an offset of 2
        ({"model_type": "t5", "n_positions": 512}, None),  # relative positions: any length runs
    ],
)
def test_the_positions_are_read_from_the_models_position_table(config, limit):
    from transformers import AutoConfig, AutoModel

    sizes = {
        "gpt2": dict(n_embd=16, n_layer=1, n_head=2),
        "roberta": dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        ),
        "t5": dict(d_model=16, num_layers=1, num_heads=2, d_ff=16, d_kv=8),
        "bart": dict(
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
        ),
    }[config["model_type"]]
    model = AutoModel.from_config(AutoConfig.for_model(**config, **sizes))
    assert check.positions(model) == limit
    check.check_positions(model, SimpleNamespace(max_len=limit or 4096, model_name_or_path="m"))
    if limit:
        with pytest.raises(
            SystemExit, match=f"--max_len {limit + 1}: the model of m has {limit} positions"
        ):
            check.check_positions(
                model, SimpleNamespace(max_len=limit + 1, model_name_or_path="m")
            )


def test_a_tokenizer_without_a_pad_token_is_one_line_before_training(
    monkeypatch, tiny_data, tmp_path
):
    load_tokenizer = dataset.load_tokenizer

    def without_pad_token(source, args):
        tokenizer = load_tokenizer(source, args)
        tokenizer.pad_token = None  # as in a tokenizer.json made without one
        return tokenizer

    monkeypatch.setattr(train.dataset, "load_tokenizer", without_pad_token)
    for extra in ([], ["--check"]):
        message = refused(
            [*data_args(tiny_data), "--outdir", tmp_path / "model", *extra],
            "the tokenizer of assets/tiny-bert has no pad token, which Dataset.collate() needs",
            "tokenizer.pad_token = tokenizer.eos_token",
        )
        assert "\n" not in message and not (tmp_path / "model").exists()


@pytest.mark.parametrize("script", ["train", "predict"])
def test_a_hook_with_the_old_parameters_is_one_line(script, monkeypatch, tiny_data, tmp_path):
    import predict

    monkeypatch.setattr(
        train.modeling, "predictions", lambda config, batch, outputs: []
    )  # before the change
    argv = (
        [*data_args(tiny_data), "--outdir", tmp_path / "model"]
        if script == "train"
        else ["--checkpoint", tmp_path / "none", "--input_file", tiny_data / "valid.jsonl"]
    )
    with pytest.raises(SystemExit) as exit_info:
        (train if script == "train" else predict).main([str(a) for a in argv])
    assert str(exit_info.value.code) == (
        "error: modeling.py: predictions(config, batch, outputs) cannot take (model, tokenizer, batch, outputs), "
        "what it is called with: give it those parameters (the list at the top of modeling.py says what each is)."
    )
    assert not (tmp_path / "model").exists()
