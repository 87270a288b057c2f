r"""Speed of train.py where users run it, every ratio printed in one run, in five sections:

    throughput  training speed side by side with a bare PyTorch loop, Hugging Face Trainer and the
                original template's data path: the same model, data, batch order and optimizer
                settings
    startup     the default job (shipped data, tiny BERT) to its first optimizer step and a
                checkpoint, wall time of the whole process, against HF Trainer doing the same;
                `import train`
    threads     `accelerate launch train.py` against `python train.py` on a MiniLM-sized model
                (threads.py)
    memory      bytes of host memory per training row, 10k against 1M rows (row_memory.py)
    deepspeed   DeepSpeed ZeRO-2 and ZeRO-3 against DDP on the same 2 CPU processes: start-up and
                samples/s on a MiniLM-sized model (deepspeed_speed.py; skipped, said in one line,
                without `pip install deepspeed`)

    python bench/speed.py                                   # all five, ~11 min on 2 CPU cores
    python bench/speed.py --sections throughput             # the training-speed table only, ~3 min
    python bench/speed.py --repeats 5 --rows 40000          # steadier figures
    python bench/speed.py --only bare template              # a subset of the contenders
    python bench/speed.py --sections throughput --only template-eval trainer-eval --eval_steps 20
                                                            # validation every 20 steps
    python bench/speed.py --model_name_or_path bert-base-cased --rows 2000 --batch_size 16 \
        --max_len 256
    python bench/speed.py --train_file data/train.jsonl     # the shipped sample data, not
                                                            # synthetic text

Contenders (each run is a fresh Python process, so start-up is measured as a user sees it):

    bare              the limit: the model, dataset.py's batches in train.py's order, fused AdamW,
                      gradient clipping, linear schedule, train mode; no accelerate, no progress
                      bar, no logging
    template          train.py itself (train.main), progress bar and all
    trainer           transformers.Trainer with its defaults (random order, pads per batch, tqdm
                      bar); the same lr, batch size, seed, weight decay, clipping and schedule; no
                      eval, no saves
    original          train.py's loop on the original template's data path: each item tokenized in
                      __getitem__ and padded to --max_len
    template-grouped  train.py --group_by_length
    trainer-grouped   Trainer with train_sampling_strategy="group_by_length"
    bare-grouped      the bare loop on train.py's --group_by_length batches (not run by default)
    data              dataset.py's loader alone, no model: how fast batches can come (not run by
                      default)
    alt, alt-grouped  another train.py (--alt_train) and/or extra options (--alt_args), to measure
                      an edit side by side with the template (run when --alt_train or --alt_args
                      is given)
    template-eval     train.py --eval_steps N: validation of the whole validation set every N
                      optimizer steps and at the last, and last/ saved at each (best/ too when the
                      loss improved: hard links to last/'s files, nothing more is written)
    trainer-eval      Trainer with eval_strategy="steps", eval_steps=N: the same validation rows,
                      eval batch size (--batch_size) and metrics (modeling.py's accuracy and macro
                      F1 of the argmax, taken on the device as train.py does), and
                      save_strategy="steps", save_steps=N: a full checkpoint (weights, optimizer,
                      scheduler, RNG) at each validation, as train.py writes one. The fairer pair:
                      with save_strategy="no" Trainer would leave no resumable state where train.py
                      does. (Trainer keeps every checkpoint-N and tracks no best; train.py replaces
                      last/.)
                      Both validate at steps N, 2N, ... and at the last; the default N, a quarter of
                      an epoch rounded up, puts 3 validations inside each epoch's timed window and
                      one after it. Their validation file is synthetic like the training data,
                      --eval_rows rows (default: a tenth of the training rows, at least 64). Not run
                      by default (they add ~1 min to the throughput section); select them with
                      --only, e.g. --only template trainer template-eval trainer-eval

How it is measured. Every contender runs with the same probe: a wrapper around Model.forward that
notes the batch shape (and, on the device, the count of non-padding tokens), and a global
optimizer-step hook that notes the time each step() returns. Throughput is taken per epoch from
the end of the --warmup_steps'th step to the end of the last one, so start-up, evaluation and saves
are outside it (except for template-eval and trainer-eval, whose validations and saves every
--eval_steps fall inside it: what they measure; the probe counts training forwards only); on CUDA
the probe synchronizes at those two points only. Start-up is the time from launching the process
to the first training forward. The contenders run in a rotated order, --repeats times; the table
gives medians, and each ratio is the median of the ratios within a repeat (so slow drift of the
machine cancels). tokens/s counts real (non-padding) tokens.
"""

import argparse
import collections
import functools
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {  # name: (loop, data path, grouped by length)
    "bare": ("bare", "dataset.py", False),
    "template": ("template", "dataset.py", False),
    "trainer": ("trainer", "dataset.py", False),
    "original": ("template", "original", False),
    "template-grouped": ("template", "dataset.py", True),
    "trainer-grouped": ("trainer", "dataset.py", True),
    "bare-grouped": ("bare", "dataset.py", True),
    "data": ("data", "dataset.py", False),
    "alt": ("template", "dataset.py", False),
    "alt-grouped": ("template", "dataset.py", True),
    "template-eval": ("template", "dataset.py", False),
    "trainer-eval": ("trainer", "dataset.py", False),
}
EVALUATING = {"template-eval", "trainer-eval"}  # validate (and save) every --eval_steps
DEFAULT = ["bare", "template", "trainer", "original", "template-grouped", "trainer-grouped"]
SECTIONS = ["throughput", "startup", "threads", "memory", "deepspeed"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model_name_or_path",
        default=str(ROOT / "assets" / "tiny-bert"),
        help="as for train.py; the default trains the shipped tiny BERT from scratch",
    )
    parser.add_argument(
        "--train_file", help="a data file for train.py (default: --rows rows of synthetic text)"
    )
    parser.add_argument("--rows", type=int, default=3000, help="synthetic training rows")
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument(
        "--mean_len",
        type=float,
        default=24,
        help="synthetic text: median length in words (log-normal, 8 .. --max_len, long tail)",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each contender; the table shows medians"
    )
    parser.add_argument(
        "--warmup_steps", type=int, default=3, help="steps at the start of each epoch left out"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CONTENDERS),
        default=DEFAULT,
        metavar="NAME",
        help=f"contenders to run, of: {' '.join(CONTENDERS)}",
    )
    parser.add_argument(
        "--alt_train", help="a modified copy of train.py, run as the contenders alt, alt-grouped"
    )
    parser.add_argument(
        "--alt_args", default="", help='extra train.py options for alt, e.g. "--num_workers 1"'
    )
    parser.add_argument(
        "--host_reads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count, in one short run each of template and trainer, the tensor reads by "
        "the host (.item(), .tolist(), bool(), ...) per step: each is a sync on a GPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every contender; 1 is what `accelerate launch` gives a CPU process, "
        "and it is steadier than 2 on a machine shared with other jobs; 0 = torch's default",
    )
    parser.add_argument(
        "--workdir", help="where data, caches and outputs go (default: a temporary folder)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        metavar="NAME",
        help=f"what to measure, of: {' '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--threads_steps", type=int, default=30, help="threads: optimizer steps per run"
    )
    parser.add_argument(
        "--memory_rows",
        type=int,
        nargs=2,
        default=[10_000, 1_000_000],
        help="memory: the two sizes of training file compared",
    )
    parser.add_argument(
        "--eval_steps",
        type=int,
        default=0,
        help="template-eval, trainer-eval: validate every N optimizer steps; 0 = a quarter of an "
        "epoch's steps, rounded up (3 validations inside each epoch's timed window)",
    )
    parser.add_argument(
        "--eval_rows",
        type=int,
        default=0,
        help="template-eval, trainer-eval: synthetic validation rows; 0 = a tenth of the training "
        "rows (at least 64)",
    )
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data


def vocabulary(model_name_or_path):
    """Words of the tokenizer's vocabulary (so that one word is one token with the tiny
    tokenizer)."""
    vocab = Path(model_name_or_path) / "vocab.txt"
    if vocab.is_file():
        words = [w for w in vocab.read_text().split() if w.isalpha() and w.islower()]
        if len(words) >= 20:
            return words
    return (
        "the food was great awful fine service slow friendly cold warm price cheap expensive room "
        "staff clean dirty view noisy quiet again never always would recommend not really movie "
        "book hotel"
    ).split()


def write_synthetic(path, rows, words, max_len, mean_len, seed):
    """Rows of random words with a wide, long-tailed length distribution (8 .. max_len - 2 words,
    log-normal), the case where padding to the longest of a random batch wastes most of the
    compute."""
    rng = random.Random(seed)
    labels = ["negative", "neutral", "positive"]
    with open(path, "w") as f:
        for _ in range(rows):
            n = min(max_len - 2, max(8, int(rng.lognormvariate(math.log(mean_len), 0.7))))
            f.write(
                json.dumps({"text": " ".join(rng.choices(words, k=n)), "label": rng.choice(labels)})
                + "\n"
            )


def original_generate_dataset(path, split, tokenizer, args, labels=None):
    """The original template's data path, with the interface train.py expects of dataset.py."""
    import torch

    from utils import load_rows

    class OriginalDataset(torch.utils.data.Dataset):
        def __init__(self, texts, names, labels):
            self.texts, self.labels, self.tokenizer = texts, labels, tokenizer
            self.ids = [labels.index(name) for name in names]
            self.collate = torch.utils.data.default_collate

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, i):
            encoded = tokenizer(
                self.texts[i],
                padding="max_length",
                truncation=True,
                max_length=args.max_len,
                return_tensors="pt",
            )
            item = {key: value[0] for key, value in encoded.items()}
            item["labels"] = torch.tensor(self.ids[i])
            return item

    rows = load_rows(path, split)
    names = [str(label) for label in rows["label"]]
    return OriginalDataset(rows["text"], names, labels or sorted(set(names)))


# ---------------------------------------------------------------- the probe
# (in each contender's process)


class Probe:
    """Notes each training step the same way in every contender: the batch at Model.forward (train
    mode only) and the time at which optimizer.step() returns (a global hook, so no loop is
    edited)."""

    def __init__(self, steps_per_epoch, warmup_steps):
        self.first_forward = None
        self.shapes, self.real, self.ends, self.cpu_ends = [], [], [], {}
        self.steps_per_epoch, self.warmup_steps = steps_per_epoch, warmup_steps

    def install(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        import modeling

        forward = modeling.Model.forward

        @functools.wraps(forward)
        def probed_forward(model, *args, **kwargs):
            if model.training:
                if self.first_forward is None:
                    self.first_forward = time.time()
                ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
                self.shapes.append(tuple(ids.shape))
                self.real.append(
                    mask.sum() if mask is not None else ids.numel()
                )  # stays on the device: no sync
            return forward(model, *args, **kwargs)

        modeling.Model.forward = probed_forward
        self.cuda = torch.cuda.is_available()
        register_optimizer_step_post_hook(self.on_step)

    def count_host_reads(self, stop):
        """Counts the calls that read a tensor's value on the host (each one waits for a GPU)
        between the end of the first step and the end of step `stop`, by call site."""
        import torch

        self.reads, self.counting, self.stop = collections.Counter(), False, stop
        for name in [
            "item",
            "tolist",
            "__bool__",
            "__float__",
            "__int__",
            "__index__",
            "numpy",
            "cpu",
        ]:

            def read(tensor, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
                if self.counting:
                    code, line = sys._getframe(1).f_code, sys._getframe(1).f_lineno
                    path = code.co_filename
                    path = (
                        os.path.relpath(path, ROOT)
                        if path.startswith(str(ROOT))
                        else path.split("site-packages/")[-1]
                    )
                    self.reads[f"{path}:{line} {code.co_name}() .{_name}"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)

    def on_step(self, optimizer, args, kwargs):
        if hasattr(self, "reads"):
            self.counting = 1 <= len(self.ends) + 1 < self.stop
        position = len(self.ends) % self.steps_per_epoch
        if position in (
            self.warmup_steps - 1,
            self.steps_per_epoch - 1,
        ):  # the two ends of the timed window
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.cpu_ends[len(self.ends)] = cpu_seconds()
        self.ends.append(time.time())

    def result(self):
        return {
            "first_forward": self.first_forward,
            "ends": self.ends,
            "cpu_ends": self.cpu_ends,
            "shapes": self.shapes,
            "real": [int(r) for r in self.real],
        }


def cpu_seconds():
    """CPU time of this process and of its DataLoader workers, live or ended."""
    import psutil

    process = psutil.Process()
    total = sum(process.cpu_times()[:4])  # user, system, and those of children waited for
    for worker in process.children(recursive=True):
        try:
            total += sum(worker.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def child(spec):
    """Runs one contender in this process and writes what the probe saw to spec["result"]."""
    sys.path.insert(0, str(ROOT))
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    probe = Probe(spec["steps_per_epoch"], spec["warmup_steps"])
    probe.install()
    if spec.get("count_reads"):
        probe.count_host_reads(spec["stop_after_steps"])
    {"bare": run_bare, "template": run_template, "trainer": run_trainer, "data": run_data}[
        spec["loop"]
    ](spec, probe)
    result = probe.result()
    result["threads"], result["cuda"] = torch.get_num_threads(), torch.cuda.is_available()
    result["reads"] = dict(getattr(probe, "reads", {}))
    Path(spec["result"]).write_text(json.dumps(result))


def run_template(spec, probe):
    if spec.get("train_py"):  # --alt_train: that file, imported under the name train
        import importlib.util

        module_spec = importlib.util.spec_from_file_location("train", spec["train_py"])
        train = sys.modules["train"] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(train)
    else:
        import train
    if spec["data_path"] == "original":
        train.generate_dataset = original_generate_dataset
    argv = [
        "--train_file",
        spec["train_file"],
        "--valid_file",
        spec["valid_file"],
        "--model_name_or_path",
        spec["model"],
        "--epochs",
        spec["epochs"],
        "--batch_size",
        spec["batch_size"],
        "--lr",
        spec["lr"],
        "--max_len",
        spec["max_len"],
        "--seed",
        spec["seed"],
        "--outdir",
        spec["outdir"],
        "--mixed_precision",
        spec["mixed_precision"],
    ]
    argv += ["--group_by_length"] if spec["grouped"] else []
    argv += ["--stop_after_steps", spec["stop_after_steps"]] if spec.get("stop_after_steps") else []
    argv += ["--eval_steps", spec["eval_steps"]] if spec.get("evaluating") else []
    train.main([str(a) for a in argv] + spec.get("extra_args", []))


def load_data(spec):
    from types import SimpleNamespace

    from dataset import generate_dataset, load_tokenizer

    options = SimpleNamespace(
        max_len=spec["max_len"],
        dataset_config=None,
        train_file=spec["train_file"],
        train_split="train",
    )
    tokenizer = load_tokenizer(spec["model"], options)
    return tokenizer, generate_dataset(spec["train_file"], "train", tokenizer, options)


def load_valid(spec, path, tokenizer, train_set):
    """The validation rows of `path`, tokenized as train.py does (the training set's labels)."""
    from types import SimpleNamespace

    from dataset import generate_dataset

    options = SimpleNamespace(max_len=spec["max_len"], dataset_config=None)
    return generate_dataset(path, "validation", tokenizer, options, train_set.labels)


def run_bare(spec, probe):
    """The same work per step as train.py, and nothing else."""
    import torch
    from accelerate.data_loader import SeedableRandomSampler
    from transformers import get_scheduler, set_seed

    from core import resume
    from modeling import build_model

    set_seed(spec["seed"])
    tokenizer, train_set = load_data(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(spec["model"], train_set).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=spec["lr"],
        fused=True,
    )
    if spec["grouped"]:
        sampler = resume.LengthGroupedSampler(spec["batch_size"], train_set, spec["seed"])
    else:
        sampler = SeedableRandomSampler(
            train_set, generator=torch.Generator(), data_seed=spec["seed"]
        )
    loader = torch.utils.data.DataLoader(
        train_set,
        spec["batch_size"],
        sampler=sampler,
        collate_fn=train_set.collate,
        pin_memory=device.type == "cuda",
    )
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=0, num_training_steps=len(loader) * spec["epochs"]
    )
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=spec["mixed_precision"] == "bf16"
    )
    for epoch in range(spec["epochs"]):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


def run_trainer(spec, probe):
    from transformers import Trainer, TrainingArguments, set_seed

    from modeling import build_model

    set_seed(spec["seed"])
    tokenizer, train_set = load_data(spec)
    model = build_model(spec["model"], train_set)
    evaluation = {"save_strategy": "no", "eval_strategy": "no"}
    if spec.get("evaluating"):  # trainer-eval: as train.py --eval_steps N (see the docstring)
        evaluation = {
            "eval_strategy": "steps",
            "eval_steps": spec["eval_steps"],
            "per_device_eval_batch_size": spec["batch_size"],
            "save_strategy": "steps",
            "save_steps": spec["eval_steps"],
        }
    args = TrainingArguments(
        output_dir=spec["outdir"],
        per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=spec["epochs"],
        learning_rate=spec["lr"],
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch_fused",
        seed=spec["seed"],
        bf16=spec["mixed_precision"] == "bf16",
        max_steps=spec.get("stop_after_steps") or -1,
        report_to="none",
        remove_unused_columns=False,  # forward(labels, **inputs) would otherwise lose input_ids
        train_sampling_strategy="group_by_length" if spec["grouped"] else "random",
        **evaluation,
    )
    # The tokenized datasets.Dataset, as a Trainer user passes it; Trainer's default collator pads
    # per batch.
    Trainer(
        model=model,
        args=args,
        train_dataset=train_set.rows,
        processing_class=tokenizer,
        **(trainer_validation(spec, tokenizer, train_set) if spec.get("evaluating") else {}),
    ).train()


def trainer_validation(spec, tokenizer, train_set):
    """trainer-eval's Trainer arguments: the validation rows, and the metrics of train.py's
    validation from the same inputs (modeling.py's compute_metrics of the predicted classes)."""
    import torch

    import modeling

    def predicted(logits, labels):  # as metric_inputs(): the argmax, on the device, per batch
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

    def compute_metrics(prediction):
        return modeling.compute_metrics(
            {
                "predictions": torch.as_tensor(prediction.predictions),
                "labels": torch.as_tensor(prediction.label_ids),
            }
        )

    return {
        "eval_dataset": load_valid(spec, spec["valid_file"], tokenizer, train_set).rows,
        "compute_metrics": compute_metrics,
        "preprocess_logits_for_metrics": predicted,
    }


def run_data(spec, probe):
    """dataset.py's batches in train.py's order, with no model: the data path's own speed."""
    import torch
    from accelerate.data_loader import SeedableRandomSampler

    _, train_set = load_data(spec)
    sampler = SeedableRandomSampler(train_set, generator=torch.Generator(), data_seed=spec["seed"])
    loader = torch.utils.data.DataLoader(
        train_set, spec["batch_size"], sampler=sampler, collate_fn=train_set.collate
    )
    for epoch in range(spec["epochs"]):
        sampler.set_epoch(epoch)
        for batch in loader:
            if probe.first_forward is None:
                probe.first_forward = time.time()
            probe.shapes.append(tuple(batch["input_ids"].shape))
            probe.real.append(batch["attention_mask"].sum())
            probe.on_step(None, (), {})


# ---------------------------------------------------------------- the parent


def launch(name, spec, workdir, env, run_index):
    """Runs one contender in a fresh process; returns its figures."""
    loop, data_path, grouped = CONTENDERS[name]
    if name.startswith("alt"):
        spec = {**spec, "train_py": spec["alt_train"], "extra_args": shlex.split(spec["alt_args"])}
    if name in EVALUATING:  # validation rows of their own, validated every --eval_steps
        spec = {**spec, "evaluating": True, "valid_file": spec["eval_valid_file"]}
    spec = {
        **spec,
        "loop": loop,
        "data_path": data_path,
        "grouped": grouped,
        "outdir": str(workdir / "runs" / f"{name}-{run_index}"),
        "result": str(workdir / "runs" / f"{name}-{run_index}.json"),
    }
    log = workdir / "runs" / f"{name}-{run_index}.log"
    started = time.time()
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finished = time.time()
    if done.returncode != 0:
        sys.exit(
            f"{name} failed (exit {done.returncode}); its output is in {log}:\n"
            + "\n".join(log.read_text().splitlines()[-15:])
        )
    result = json.loads(Path(spec["result"]).read_text())
    return result if spec.get("count_reads") else summarize(result, spec, started, finished)


def summarize(result, spec, started, finished):
    steps, warmup = spec["steps_per_epoch"], spec["warmup_steps"]
    ends, shapes, real = result["ends"], result["shapes"], result["real"]
    expected = steps * spec["epochs"]
    if len(ends) != expected or len(shapes) != expected:
        sys.exit(
            f"expected {expected} steps, the probe saw {len(ends)} optimizer steps and "
            f"{len(shapes)} training batches ({spec['loop']})"
        )
    seconds = cpu_seconds = samples = padded = tokens = 0
    for epoch in range(spec["epochs"]):
        first, last = epoch * steps + warmup - 1, epoch * steps + steps - 1
        seconds += ends[last] - ends[first]
        cpu_seconds += result["cpu_ends"][str(last)] - result["cpu_ends"][str(first)]
        window = range(first + 1, last + 1)
        samples += sum(shapes[i][0] for i in window)
        padded += sum(shapes[i][0] * shapes[i][1] for i in window)
        tokens += sum(real[i] for i in window)
    epoch_seconds = [
        ends[e * steps + steps - 1] - (ends[e * steps - 1] if e else result["first_forward"])
        for e in range(spec["epochs"])
    ]
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "padding": 1 - tokens / padded,
        "samples_per_cpu_s": samples / cpu_seconds,
        "cpu_share": cpu_seconds / seconds,
        "startup_s": result["first_forward"] - started,
        "wall_s": finished - started,
        "step_ms": 1000 * seconds / (steps - warmup) / spec["epochs"],
        "epoch_s": epoch_seconds,
        "batches": [tuple(s) + (r,) for s, r in zip(shapes, real)],
        "threads": result["threads"],
        "cuda": result["cuda"],
    }


def machine(threads):
    import accelerate
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only (no GPU)"
    return (
        f"{cpu}, {os.cpu_count()} cores; {device}; torch {torch.__version__} "
        f"({threads} thread(s) per contender), transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, Python {platform.python_version()}"
    )


def load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def prepare(args, workdir):
    """Writes the data, warms the tokenization cache (every contender then reads the same cached
    tokens, as a second run of train.py would) and returns the spec shared by all contenders."""
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    words = vocabulary(args.model_name_or_path)
    train_file = args.train_file
    if not train_file:
        train_file = workdir / f"train-{args.rows}.jsonl"
        write_synthetic(train_file, args.rows, words, args.max_len, args.mean_len, args.seed)
    valid_file = workdir / "valid.jsonl"
    write_synthetic(valid_file, 64, words, args.max_len, args.mean_len, args.seed + 1)
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(workdir / "datasets-cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("ACCELERATE_USE_CPU", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    spec = {
        "model": args.model_name_or_path,
        "train_file": str(Path(train_file).resolve()),
        "valid_file": str(valid_file),
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "threads": args.threads,
        "warmup_steps": args.warmup_steps,
        "alt_train": str(Path(args.alt_train).resolve()) if args.alt_train else None,
        "alt_args": args.alt_args,
    }
    evaluating = EVALUATING & set(args.only)
    if evaluating:  # written by warm(), which knows the training rows
        spec["eval_valid_file"] = str(workdir / "valid-eval.jsonl")
    eval_data = {"rows": args.eval_rows, "mean_len": args.mean_len, "seed": args.seed + 2}
    warm = subprocess.run(
        [sys.executable, __file__, "--warm", json.dumps({**spec, "eval_data": eval_data})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if warm.returncode != 0:
        sys.exit(f"could not tokenize {train_file}:\n{warm.stdout[-2000:]}\n{warm.stderr[-3000:]}")
    info = json.loads(warm.stdout.strip().splitlines()[-1])
    spec["steps_per_epoch"] = math.ceil(info["rows"] / args.batch_size)
    if spec["steps_per_epoch"] < args.warmup_steps + 5:
        sys.exit(
            f"only {spec['steps_per_epoch']} steps per epoch: "
            "give more --rows or a smaller --batch_size"
        )
    if evaluating:
        spec["eval_steps"] = args.eval_steps or math.ceil(spec["steps_per_epoch"] / 4)
    return spec, env, info


def warm(spec):
    """Tokenizes the training and validation files into the cache, as train.py does; writes the
    validation file of template-eval and trainer-eval first when they run."""
    sys.path.insert(0, str(ROOT))
    tokenizer, train_set = load_data(spec)
    load_valid(spec, spec["valid_file"], tokenizer, train_set)
    eval_rows = 0
    if spec.get("eval_valid_file"):
        data = spec["eval_data"]
        eval_rows = data["rows"] or max(64, len(train_set) // 10)
        words = vocabulary(spec["model"])
        write_synthetic(
            spec["eval_valid_file"],
            eval_rows,
            words,
            spec["max_len"],
            data["mean_len"],
            data["seed"],
        )
        load_valid(spec, spec["eval_valid_file"], tokenizer, train_set)
    lengths = train_set.lengths
    print(
        json.dumps(
            {
                "rows": len(train_set),
                "mean_tokens": float(lengths.mean()),
                "max_tokens": int(lengths.max()),
                "p50": float(sorted(lengths)[len(lengths) // 2]),
                "eval_rows": eval_rows,
            }
        )
    )


def run_all(args, names, spec, env, workdir, progress=print):
    """Each contender --repeats times, in an order rotated by one at each repeat;
    {name: [figures, ...]}."""
    results = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            figures = launch(name, spec, workdir, env, repeat)
            results[name].append(figures)
            progress(
                f"  repeat {repeat + 1}/{args.repeats}  {name:17s} "
                f"{figures['samples_per_s']:9.1f} samples/s  "
                f"start-up {figures['startup_s']:5.2f} s  wall {figures['wall_s']:5.1f} s"
            )
    return results


def count_reads(names, spec, workdir, env, steps=30):
    """{name: {call site: reads per step}} over steps 2..`steps` of one run of each contender."""
    counts = {}
    for name in names:
        result = launch(
            name, {**spec, "count_reads": True, "stop_after_steps": steps}, workdir, env, "reads"
        )
        counts[name] = {
            site: n / (steps - 1)
            for site, n in sorted(result["reads"].items(), key=lambda kv: -kv[1])
        }
    return counts


def report_reads(counts):
    print()
    print(
        "host reads of tensor values per training step "
        "(.item() .tolist() bool() float() int() .numpy() .cpu(); "
        "each waits for the GPU when the tensor is on one; "
        "blocking copies to the device are not counted):"
    )
    for name, sites in counts.items():
        print(f"  {name}: {sum(sites.values()):.2f} per step" + ("" if sites else " (none)"))
        for site, n in sites.items():
            print(f"    {n:5.2f}  {site}")


def median(values):
    return statistics.median(values)


def ratio(results, a, b, key="samples_per_s"):
    """Median over the repeats of a/b within each repeat, and the range."""
    if a not in results or b not in results:
        return None
    values = [x[key] / y[key] for x, y in zip(results[a], results[b])]
    return median(values), min(values), max(values)


RATIOS = [  # label, a, b, what the target says
    ("template / bare (same batches)", "template", "bare", ">= 0.97"),
    ("template / trainer (same batches)", "template", "trainer", ""),
    ("template --group_by_length / trainer default", "template-grouped", "trainer", ">= 2"),
    (
        "template --group_by_length / trainer group_by_length",
        "template-grouped",
        "trainer-grouped",
        "",
    ),
    (
        "template --group_by_length / bare grouped (same batches)",
        "template-grouped",
        "bare-grouped",
        "",
    ),
    ("template / original data path (pad to max_len)", "template", "original", ""),
    ("bare / data path alone", "bare", "data", ""),
    ("alt / template", "alt", "template", ""),
    ("alt --group_by_length / template --group_by_length", "alt-grouped", "template-grouped", ""),
    (
        "validation every {eval_steps} steps: train.py / Trainer",
        "template-eval",
        "trainer-eval",
        ">= 1.0",
    ),
]


def report(args, spec, info, results, loads):
    cpu = all(r["threads"] and not r.get("cuda") for runs in results.values() for r in runs)
    print()
    print(
        f"machine: {machine(next(iter(results.values()))[0]['threads'])}; "
        f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end"
    )
    print(
        f"model: {args.model_name_or_path}; data: {args.train_file or 'synthetic'} "
        f"({info['rows']} rows, tokens per row: median {info['p50']:.0f}, "
        f"mean {info['mean_tokens']:.1f}, max {info['max_tokens']}); "
        f"batch {args.batch_size}, max_len {args.max_len}, "
        f"{args.epochs} epoch(s) of {spec['steps_per_epoch']} steps, "
        f"the first {args.warmup_steps} of each untimed; medians of {args.repeats} runs each"
    )
    if EVALUATING & set(results):
        steps, n = spec["steps_per_epoch"], spec["eval_steps"]
        inside = sum(  # validations after the steps that end inside a timed window
            1
            for e in range(args.epochs)
            for k in range(e * steps + args.warmup_steps, e * steps + steps)
            if k % n == 0
        )
        print(
            f"template-eval, trainer-eval: validation of {info['eval_rows']} rows (batch "
            f"{args.batch_size}) and a checkpoint every {n} steps and at the last; {inside} "
            f"of them inside the timed windows"
            + ("" if inside else " (none: the ratio compares no validation; lower --eval_steps)")
        )
    print()
    header = (
        f"{'contender':17s} {'samples/s':>10s} {'samples/':>9s} {'tokens/s':>9s} {'ms/step':>8s} "
        f"{'padding':>8s} {'start-up':>9s} {'wall':>6s}"
    )
    print(header)
    print(
        f"{'':17s} {'':>10s} {'CPU-s':>9s} {'':>9s} {'':>8s} {'':>8s} {'to step 1':>9s} {'s':>6s}"
    )
    print("-" * len(header))
    for name, runs in results.items():

        def m(key):
            return median([r[key] for r in runs])

        print(
            f"{name:17s} {m('samples_per_s'):10.1f} {m('samples_per_cpu_s'):9.1f} "
            f"{m('tokens_per_s'):9.0f} {m('step_ms'):8.2f} {m('padding'):8.1%} "
            f"{m('startup_s'):8.2f}s {m('wall_s'):6.1f}"
        )
    print()
    print("ratios of throughput (samples/s), median of the per-repeat ratios [min, max]:")
    print(f"  {'':58s} {'wall clock':>22s}   {'CPU time':>22s}")
    for label, a, b, target in RATIOS:
        label = label.format(eval_steps=spec.get("eval_steps"))
        wall, cpu_time = ratio(results, a, b), ratio(results, a, b, "samples_per_cpu_s")
        if wall:
            print(
                f"  {label:58s} {wall[0]:6.3f} [{wall[1]:.3f}, {wall[2]:.3f}]   {cpu_time[0]:6.3f} "
                f"[{cpu_time[1]:.3f}, {cpu_time[2]:.3f}]  {'target ' + target if target else ''}"
            )
    startup = ratio(results, "template", "trainer", "startup_s")
    # in this harness, which imports torch and transformers before train.py can turn the GC off
    if startup:
        print(
            f"  {'start-up to the first step in this harness: template / trainer':58s} "
            f"{startup[0]:6.3f} [{startup[1]:.3f}, {startup[2]:.3f}]   "
            "(as users run it: the start-up section)"
        )
    for a, b in [
        ("template", "bare"),
        ("template", "trainer"),
        ("template-grouped", "bare-grouped"),
        ("original", "template"),
        ("template-eval", "template"),
        ("trainer-eval", "trainer"),
    ]:
        if a in results and b in results:
            batches_a, batches_b = results[a][0]["batches"], results[b][0]["batches"]
            if a == "original":  # padded to max_len: compare batch sizes and real tokens only
                batches_a, batches_b = (
                    [(s[0], s[2]) for s in batches_a],
                    [(s[0], s[2]) for s in batches_b],
                )
            print(
                f"  {a} and {b} saw {'the same' if batches_a == batches_b else 'DIFFERENT'} "
                f"batches (shape and real tokens of every step)"
            )
    if cpu:
        print(
            "CPU time: the process's own CPU seconds in the same window "
            "(other jobs on the machine do not count)."
        )


# ---------------------------------------------------------------- start-up


def trainer_job(outdir):
    """What the default job does in its first step, with HF Trainer: the shipped data through
    dataset.py, the tiny BERT of modeling.py, one optimizer step of train.py's default batch and lr,
    one checkpoint."""
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from transformers import Trainer, TrainingArguments, set_seed

    from modeling import build_model

    set_seed(42)
    tokenizer, train_set = load_data(
        {"model": "assets/tiny-bert", "train_file": "data/train.jsonl", "max_len": 128}
    )
    model = build_model("assets/tiny-bert", train_set)
    args = TrainingArguments(
        output_dir=outdir,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        weight_decay=0.01,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=42,
    )
    Trainer(
        model=model, args=args, train_dataset=train_set.rows, processing_class=tokenizer
    ).train()


def measure_startup(repeats, workdir, progress=print):
    """{contender: median seconds of the whole process}, rotated order; caches warmed first,
    untimed."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "startup-cache"), "HF_HUB_OFFLINE": "1"}
    contenders = {
        "template": lambda out: [
            sys.executable,
            "train.py",
            "--stop_after_steps",
            "1",
            "--outdir",
            out,
        ],
        "trainer": lambda out: [sys.executable, __file__, "--trainer_job", out],
        "import train": lambda out: [sys.executable, "-c", "import train"],
    }
    for name in ("template", "trainer"):
        subprocess.run(
            contenders[name](str(workdir / f"startup-warm-{name}")),
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
    times = {name: [] for name in contenders}
    for repeat in range(repeats):
        names = (
            list(contenders)[repeat % len(contenders) :]
            + list(contenders)[: repeat % len(contenders)]
        )
        for name in names:
            start = time.perf_counter()
            result = subprocess.run(
                contenders[name](str(workdir / f"startup-{name}-{repeat}")),
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            times[name].append(time.perf_counter() - start)
            if result.returncode != 0:
                sys.exit(f"start-up: {name} failed:\n{result.stderr[-2000:]}")
            progress(
                f"  start-up, repeat {repeat + 1}/{repeats}: {name:26s} {times[name][-1]:6.2f} s"
            )
    return {name: median(t) for name, t in times.items()}


def report_startup(medians):
    print("  default job to its first optimizer step and a checkpoint, whole process (medians):")
    for name, seconds in medians.items():
        print(f"    {name:26s} {seconds:6.2f} s")
    print(
        f"  {'start-up to step 1 and a checkpoint: template / trainer':58s} "
        f"{medians['template'] / medians['trainer']:6.3f}   target <= 0.6"
    )


def main(argv=None):
    args = parse_args(argv)
    names = list(dict.fromkeys(args.only))
    if (args.alt_train or args.alt_args) and args.only == DEFAULT:
        names += ["alt", "alt-grouped"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import deepspeed_speed
    import row_memory
    import threads

    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        if "throughput" in args.sections:
            print(f"throughput: preparing data in {workdir} ...")
            spec, env, info = prepare(args, workdir)
            loads = [load()]
            results = run_all(args, names, spec, env, workdir)
            loads.append(load())
            reads = [n for n in ("template", "trainer") if n in names] if args.host_reads else []
            counts = count_reads(reads, spec, workdir, env) if reads else {}
        startup = measure_startup(args.repeats, workdir) if "startup" in args.sections else None
        cores = (
            threads.measure(args.threads_steps, args.repeats)
            if "threads" in args.sections
            else None
        )
        memory = row_memory.measure(args.memory_rows) if "memory" in args.sections else None
        zero = None
        if "deepspeed" in args.sections and importlib.util.find_spec("deepspeed") is None:
            print("deepspeed: not installed (pip install deepspeed): section skipped.")
        elif "deepspeed" in args.sections:
            zero = deepspeed_speed.measure(args.threads_steps, args.repeats)
        if "throughput" in args.sections:
            report(args, spec, info, results, loads)
            if counts:
                report_reads(counts)
        for title, figures, show in [
            ("start-up", startup, report_startup),
            (
                "threads (MiniLM-sized model, `accelerate launch` vs `python`)",
                cores,
                lambda m: threads.report(m, args.threads_steps),
            ),
            (
                "memory per training row (default job stopped after one step)",
                memory,
                row_memory.report,
            ),
            (
                "DeepSpeed against DDP (2 CPU processes, MiniLM-sized model)",
                zero,
                lambda m: deepspeed_speed.report(m, args.threads_steps),
            ),
        ]:
            if figures:
                print(f"\n{title}:")
                show(figures)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--warm":
        warm(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--trainer_job":
        trainer_job(sys.argv[2])
    else:
        main()
