"""Are the two user files right? The checks every run makes before its first step (a folder that
would run its own code, the hooks' parameters, the collate function, --max_len against the model's
positions, a forward() without a scalar loss, a --metric_for_best no metric has), and `--check`: a
few seconds of checks on the real data and model instead of a run, one line each (PASS / WARN /
FAIL, the figure measured, what to look at), nothing written into --outdir; the exit status is 0
only if no check failed.

    accelerate launch train.py --check                      # with any options of a normal run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py --check

The --check checks follow the well-known recipe for training neural networks: look at a batch, check
the initial loss, that every layer gets a gradient, that padding changes nothing, that one batch can
be learnt by heart, that the model survives save_pretrained / from_pretrained, that a batch split in
two takes the same step, and what the time goes to.
"""

import copy
import inspect
import itertools
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy
import torch
from accelerate.utils import DistributedType, send_to_device
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers.utils import ModelOutput

from core import step
from core.checkpoint import is_optimizer
from utils import UserError

# ---------------------------------------------------------------- before step 1


def refuse_folders_with_code(args):
    """The folders of --model_name_or_path and --resume, checked by refuse_custom_code()."""
    for folder, option in [
        (args.model_name_or_path, "--model_name_or_path"),
        (args.resume, "--resume"),
    ]:
        if folder and Path(folder).is_dir():
            refuse_custom_code(folder, option)


def refuse_custom_code(folder, what):
    """A model folder or checkpoint that asks to run code of its own (auto_map) is refused: this
    template never runs code that came with a folder (and never asks whether it may)."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = Path(folder) / name
        try:
            asks = path.is_file() and "auto_map" in json.loads(path.read_text())
        except (ValueError, TypeError):
            continue  # not ours to judge here: loading it names the problem
        if asks:
            raise UserError(
                f"{what} {folder}: {name} asks to run code that came with the folder (auto_map); "
                "this template never runs such code. Use a folder without custom code."
            )


LOWER_IS_BETTER = {"loss", "error", "err", "mse", "mae", "rmse", "perplexity", "ppl", "wer", "cer"}


POSITIONS = (
    "position_embeddings",
    "wpe",
    "embed_positions",
)  # BERT, RoBERTa...; GPT-2; BART, OPT, Marian


def positions(model):
    """The fewest positions a learnt (or fixed) position table of the model holds, None without one
    (T5's relative positions, rotary ones). Read from the tables, not the configs: a T5 config says
    n_positions 512 and runs longer inputs; RoBERTa's 514 holds 512 (two offset rows)."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITIONS:
            offset = getattr(module, "offset", None)  # BART's and OPT's tables start 2 rows in
            if offset is None:  # RoBERTa's count from padding_idx + 1
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            limits.append(module.num_embeddings - offset)
    return min(limits, default=None)


def check_positions(model, args):
    """--max_len beyond the model's positions (or those of a model inside it: the default wraps an
    encoder) is refused before anything runs: else an input that long fails mid-run with
    'IndexError: index out of range in self'."""
    limit = positions(model)
    if limit is not None and args.max_len > limit:
        raise UserError(
            f"--max_len {args.max_len}: the model of {args.model_name_or_path} has {limit} "
            f"positions, so a longer input would fail mid-run. Pass --max_len {limit} or less."
        )


HOOKS = {
    "metric_inputs": "model, tokenizer, batch, outputs",
    "compute_metrics": "gathered",
    "loss_items": "batch",
    "format_samples": "model, tokenizer, batch, outputs, k",
    "predictions": "model, tokenizer, batch, outputs",
}  # what train.py and predict.py pass


def check_hooks(modeling):
    """modeling.py's optional hooks take what they are given: one made for other parameters (the
    hooks before they took the model and the tokenizer) is one line, not a TypeError mid-run."""
    for name, parameters in HOOKS.items():
        hook = getattr(modeling, name, None)
        try:
            if hook is not None:
                expected = parameters.split(", ")
                signature = inspect.signature(hook)
                signature.bind(*expected)
                # Named as the parameters are but elsewhere (the old hooks, `model` and
                # `tokenizer` defaulted at the end): each would get another's value.
                positional = [
                    p.name
                    for p in signature.parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ]
                if any(
                    n in positional and positional.index(n) != i for i, n in enumerate(expected)
                ):
                    raise TypeError("parameters in another order")
        except TypeError:
            raise UserError(
                f"modeling.py: {name}{inspect.signature(hook)} cannot take ({parameters}), what it "
                f"is called with: give it those parameters (the list at the top of modeling.py "
                f"says what each is)."
            ) from None


def check_collate(train_set, tokenizer, args):
    """Two training examples of unequal length through Dataset.collate(), before the model is built:
    a tokenizer without a pad token is one line here, not transformers' traceback mid-run."""
    collate = getattr(train_set, "collate", None)
    lengths = getattr(train_set, "lengths", None)
    if collate is None or len(train_set) < 2:
        return
    pair = (
        [int(numpy.argmin(lengths)), int(numpy.argmax(lengths))] if lengths is not None else [0, 1]
    )
    try:
        collate([train_set[i] for i in pair])
    except (
        ValueError,
        TypeError,
    ):  # transformers' "Asking to pad ...", or None in a padding by hand
        if tokenizer is None or getattr(tokenizer, "pad_token", "") is not None:
            raise  # another mistake in collate(): its own traceback says where
        raise UserError(
            f"the tokenizer of {args.resume or args.model_name_or_path} has no pad token, which "
            f"Dataset.collate() needs to pad a batch: set one in dataset.py's load_tokenizer() "
            f"(tokenizer.pad_token = tokenizer.eos_token, as examples/causal_lm does) or give the "
            f"model folder's tokenizer_config.json a pad_token."
        ) from None


def first_batch(model, tokenizer, train_set, valid_set, args, hooks, device=torch.device("cpu")):
    """Before any training: the first validation examples and the longest training example through
    the model, so that a forward without a scalar loss, a --max_len beyond the model's positions, a
    per-example hook that gives one number for the batch or a --metric_for_best that no metric has
    costs seconds, not an epoch. Returns whether a greater --metric_for_best is better. Changes
    nothing: eval mode, no gradients, RNG kept. `hooks`: modeling.py; `device`: the model's."""
    collate = getattr(valid_set, "collate", torch.utils.data.default_collate)
    samples = [valid_set[i] for i in range(min(2, len(valid_set)))]
    lengths = getattr(train_set, "lengths", None)
    samples += [train_set[int(lengths.argmax())]] if lengths is not None else []
    batch = send_to_device(collate(samples), device)
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            outputs = step.forward(model, batch)
        except (RuntimeError, IndexError) as e:
            longest = f"the longest, {int(lengths.max())} tokens, " if lengths is not None else ""
            error = str(e).splitlines()[0][:300]
            if error.startswith("Target ") and "out of bounds" in error:  # cross_entropy's
                positions = getattr(model.config, "max_position_embeddings", None)
                within = f" (the model has {positions} positions)" if positions else ""
                raise UserError(
                    f"a label is beyond what the model's outputs cover ({error}), on a batch of "
                    f"validation and training examples ({longest}--max_len {args.max_len}). A "
                    f"label that is a position in the sequence (an answer's start or end) must "
                    f"lie inside it: give a longer --max_len{within}, or drop or clip such "
                    f"examples in dataset.py. A class label: the model has fewer classes than "
                    f"the data."
                ) from None
            raise UserError(
                f"Model.forward() failed on a batch of validation and training examples ({longest}"
                f"--max_len {args.max_len}): {error}. If the model has fewer positions, lower "
                "--max_len."
            ) from None
        loss_of(model, batch, outputs)
        metrics = {}
        if hasattr(hooks, "metric_inputs") and hasattr(hooks, "compute_metrics"):
            inputs = hooks.metric_inputs(model, tokenizer, batch, outputs)
            per_example(inputs, "metric_inputs(model, tokenizer, batch, outputs)", batch)
            metrics = hooks.compute_metrics(inputs)
        if hasattr(hooks, "loss_items"):
            per_example({"": hooks.loss_items(batch)}, "loss_items(batch)", batch)
        names = ["loss", *metrics]
    model.train()
    for module in model.modules():  # FSDP2 keeps what it gathered for a forward without a backward
        if isinstance(module, FSDPModule):  # (the loop's list of parameters would hold those)
            module.reshard()
    if args.metric_for_best not in names:
        raise UserError(
            f"--metric_for_best {args.metric_for_best}: not among the validation metrics "
            f"({', '.join(names)}); compute_metrics() in modeling.py makes them."
        )
    greater = args.greater_is_better
    if greater is None:  # lower is better for losses, errors and perplexities
        greater = not LOWER_IS_BETTER & set(
            args.metric_for_best.lower().replace("-", "_").split("_")
        )
    return greater


def per_example(values, hook, batch):
    """A hook's per-example tensors have one row per example of `batch`: a sum over the batch
    (a 0-dim tensor) would pass one batch and fail at the end of the epoch, concatenated."""
    rows = len(next(iter(batch.values())))
    for key, value in values.items():
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        if not torch.is_tensor(value) or value.dim() == 0 or len(value) != rows:
            what = f"['{key}'] " if key else " "
            raise UserError(
                f"modeling.py: {hook}{what}is {shape} for a batch of {rows} examples: give one "
                f"value per example (a tensor whose first dimension is the batch's), not one for "
                f"the batch."
            )


NOT_MODEL_OUTPUT = (
    "return a ModelOutput (e.g. transformers' SequenceClassifierOutput(loss=..., logits=...), "
    "or a dataclass of your own deriving from ModelOutput, as modeling.py does), not a tuple or "
    "a plain dict: train.py reads outputs.loss and the hooks outputs.logits."
)


def loss_of(model, batch, outputs):
    """One clear line for a forward() that returns no ModelOutput, or whose loss is missing or not
    a scalar."""
    if not isinstance(outputs, ModelOutput):
        kind = type(outputs).__name__
        raise UserError(f"Model.forward() returned a {kind}: {NOT_MODEL_OUTPUT}")
    loss = getattr(outputs, "loss", None)
    if loss is None:
        parameters = inspect.signature(
            type(getattr(model, "module", model)).forward
        ).parameters  # DDP: .module
        swallowed = [k for k in batch if k not in parameters]
        hint = (
            f" The batch's keys {', '.join(swallowed)} are not parameters of forward() and went "
            f"into its **{next(p.name for p in parameters.values() if p.kind is p.VAR_KEYWORD)}: "
            "is one of them meant as the labels?"
            if swallowed and any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            else ""
        )
        raise UserError(
            "Model.forward() returned no loss: return a ModelOutput with .loss set (see "
            "modeling.py)." + hint
        )
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise UserError(
            f"Model.forward() returned a loss of shape {shape}: it must be a scalar tensor (reduce "
            "it, e.g. with .mean())."
        )


def objects_under_fsdp(accelerator, objects, ema_decay=0):
    """Under FSDP2 the main process saves every object but the optimizers (whose shards each
    process saves): an object holding sharded tensors (an EMA of sharded weights, --ema_decay)
    would be saved in part. Refused before step 1 (an EMA before it is made)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    sharded = ["ema"] if ema_decay else []
    sharded += [
        name
        for name, value in objects.items()
        if not is_optimizer(value)
        and any(isinstance(v, DTensor) for v in value.state_dict().values())
    ]
    for name in sharded:
        option = " (--ema_decay)" if name == "ema" else ""
        raise UserError(
            f"'{name}'{option} holds weights sharded by FSDP2, which a checkpoint would save "
            f"in part: not supported under FSDP2. Drop it, or train with plain data "
            f"parallelism (DDP)."
        )


# ---------------------------------------------------------------- --check


PADDING_TOLERANCE = 1e-4  # float32 outputs of one example, alone and padded in a batch (absolute)
SPLIT_TOLERANCE = 1e-4  # one step's gradient, a batch whole against in two halves (relative)
# The longest the overfit and learning checks train (seconds each, then judged on the steps taken:
# a WARN, not a FAIL, if the bar is not reached yet): a MiniLM-sized model at --max_len 256 takes
# seconds a step on 2 CPU cores.
CHECK_SECONDS = 20
SPEED_SECONDS = 5  # the speed check measures fewer than its 8 batches past this
OVERFIT_STEPS, OVERFIT_FACTOR = (
    40,
    0.5,
)  # steps on one batch; the loss must end below half its start
# After them, the offset a causal LM learnt must beat "the next token" by this share.
NEXT_TOKEN_MARGIN = 0.1
LEARNING_FACTOR = (
    0.9  # the validation loss after as many steps on distinct batches, against its start
)


class Report:
    def __init__(self, accelerator):
        self.accelerator, self.failed = accelerator, 0

    def __call__(self, verdict, name, text):
        self.failed += verdict == "FAIL"
        if self.accelerator.is_main_process:
            print(f"{verdict:4}  {name:<10} {text}", flush=True)
        elif verdict == "FAIL":  # another process's own failure: said, with its rank
            print(f"FAIL  {name:<10} (process {self.accelerator.process_index}) {text}", flush=True)

    def running(self, name):
        """Which check runs now (on stderr; its verdict follows on stdout when it ends): on a large
        model one check can take minutes."""
        if self.accelerator.is_main_process:
            print(f"      {name:<10} running ...", file=sys.stderr, flush=True)


def first_tensor(outputs):
    """The output that stands for the model's answer: logits if there are any, else the first tensor
    but the loss."""
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    return next(v for k, v in outputs.items() if k != "loss" and torch.is_tensor(v))


def run(accelerator, model, tokenizer, train_set, valid_set, args, hooks, generate=None):
    """The checks, one line each; `hooks` is modeling.py (its optional loss_items, metric_inputs,
    compute_metrics, predictions and merge_predictions), `generate` dataset.py's
    generate_dataset (for the predict check). Returns 1 if one failed, else 0."""
    report = Report(accelerator)
    loss_items = getattr(hooks, "loss_items", None)
    collate = getattr(train_set, "collate", None) or torch.utils.data.default_collate
    loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    batch = next(iter(loader))

    report.running("data")
    # 1. Data: the first batch, its padding, the labels, and the batch's keys against forward()'s
    # parameters.
    shapes = ", ".join(
        f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        for k, v in batch.items()
        if torch.is_tensor(v)
    )
    padding = (
        f"; padding {1 - batch['attention_mask'].float().mean().item():.0%} of the tokens"
        if "attention_mask" in batch
        else ""
    )
    report(
        "PASS",
        "data",
        f"{len(train_set)} training and {len(valid_set)} validation examples; first batch: "
        f"{shapes}{padding}",
    )
    generative = model.can_generate()
    labels = None if generative else label_counts(train_set, collate)
    if generative:  # labels are the tokens to generate: their counts are no class balance
        report(
            "PASS",
            "labels",
            "a generative model: the labels are token ids, no class distribution to check",
        )
    elif labels is None:
        report(
            "PASS", "labels", "no integer `labels` in the batches: no class distribution to check"
        )
    elif len(labels) > 50:
        report(
            "PASS",
            "labels",
            f"{len(labels)} distinct label values (token ids?): no class distribution",
        )
    else:
        total, names = sum(labels.values()), getattr(train_set, "labels", None) or []

        def name(k):  # the class name where known
            return names[k] if 0 <= k < len(names) else k

        shares = ", ".join(f"{name(k)}: {v / total:.1%}" for k, v in sorted(labels.items()))
        rare = [name(k) for k, v in labels.items() if v / total < 0.01]
        verdict = "WARN" if len(labels) == 1 or rare else "PASS"
        hint = (
            " only one class: nothing to learn"
            if len(labels) == 1
            else f" classes under 1%: {rare}"
            if rare
            else ""
        )
        report(verdict, "labels", f"training labels {shares}{';' if hint else ''}{hint}")
    parameters = inspect.signature(type(model).forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    # A value that is not a tensor rides along for the hooks; forward() gets it only by name.
    along = [k for k, v in batch.items() if not torch.is_tensor(v) and k not in parameters]
    unknown = [k for k in batch if k not in parameters and not takes_any and k not in along]
    required = [
        name
        for name, p in parameters.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        and name != "self"
        and name not in batch
    ]
    if unknown or required:
        report(
            "FAIL",
            "keys",
            f"the batch has {unknown or 'no extra keys'} that forward() does not take, and "
            f"lacks {required or 'nothing'} that it requires: the collate function and "
            f"Model.forward() must agree on names",
        )
    else:
        taken = ", ".join(k for k in batch if k not in along)
        riding = f"; not tensors, for the hooks only: {', '.join(along)}" if along else ""
        report("PASS", "keys", f"forward() takes every key of the batch ({taken}){riding}")

    device = accelerator.device
    batch = send_to_device(batch, device)
    model = copy.deepcopy(model).to(device)  # the checks train it: the run's model stays as built
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        checks = {
            "forward": forward_and_gradients,
            "padding": padding_invariance,
            "overfit": overfit,
            "learning": learning,
            "round-trip": round_trip,
            "split": lambda *common: batch_split(*common, loss_items),
            "metrics": lambda *common: metrics(*common, tokenizer, hooks),
            "predict": lambda *common: predict_mode(*common, tokenizer, hooks, generate),
            "speed": throughput,
        }
        with torch.no_grad():
            outputs = step.forward(model, batch)
        if not isinstance(outputs, ModelOutput):  # every check reads its fields
            kind = type(outputs).__name__
            report("FAIL", "forward", f"Model.forward() returned a {kind}: {NOT_MODEL_OUTPUT}")
            checks = {}
        for name, check in checks.items():
            report.running(name)
            try:
                check(report, accelerator, model, batch, train_set, valid_set, collate, args)
            except Exception as e:  # a check that crashes: a failure of the files under test
                report("FAIL", name, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if accelerator.num_processes > 1:
        processes(report, accelerator, model, train_set, collate, args)
    failed = int(
        accelerator.reduce(torch.tensor(report.failed, device=accelerator.device), reduction="sum")
    )
    accelerator.print(f"--check: {failed} failed" if failed else "--check: every check passed")
    return 1 if failed else 0


def label_counts(train_set, collate, limit=2000):
    """Counts of the integer labels of (up to `limit`) training examples, -100 (ignored) left
    out."""
    counts = Counter()
    for start in range(0, min(len(train_set), limit), 256):
        batch = collate(
            [train_set[i] for i in range(start, min(start + 256, len(train_set), limit))]
        )
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if not torch.is_tensor(labels) or labels.is_floating_point():
            return None
        counts.update(labels[labels != -100].tolist())
    return counts


def forward_and_gradients(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """2. The loss: a finite scalar that requires grad, near ln(classes) at first. 3. Every
    trainable parameter gets a finite, non-zero gradient (those that do not are what DDP calls
    unused)."""
    model.train()
    model.zero_grad()
    loss = getattr(step.forward(model, batch), "loss", None)
    if loss is None or not torch.is_tensor(loss) or loss.dim() != 0:
        report(
            "FAIL",
            "forward",
            f"the loss is {None if loss is None else tuple(loss.shape)}, not a scalar: "
            f"return ModelOutput(loss=...) reduced to one number",
        )
        return
    if not loss.requires_grad:
        report(
            "FAIL",
            "forward",
            f"the loss {loss.item():.4f} does not require grad (computed from detached "
            f"tensors, or under torch.no_grad()?): nothing would train",
        )
        return
    if not torch.isfinite(loss):
        report(
            "FAIL",
            "forward",
            f"the initial loss is {loss.item()}: look for a log of 0 or a division by 0",
        )
        return
    classes = getattr(model.config, "num_labels", 0) if getattr(train_set, "labels", None) else 0
    if classes > 1:
        expected = math.log(classes)
        verdict = "WARN" if loss.item() > 3 * expected else "PASS"
        report(
            verdict,
            "forward",
            f"initial loss {loss.item():.4f} (ln {classes} = {expected:.4f} for a uniform "
            f"guess{'; far above it: the head starts too confident' if verdict == 'WARN' else ''})",
        )
    else:
        report(
            "PASS", "forward", f"initial loss {loss.item():.4f}, a finite scalar that requires grad"
        )
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not p.grad.any()]
    nonfinite = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    if missing or nonfinite:
        report(
            "FAIL",
            "gradients",
            f"{len(missing)} of {len(trainable)} parameters get no gradient (unused: DDP "
            f"fails on them, or they stay random): {', '.join(missing[:5])}"
            + (f"; non-finite gradients: {', '.join(nonfinite[:5])}" if nonfinite else ""),
        )
    else:
        report(
            "PASS",
            "gradients",
            f"all {len(trainable)} trainable parameters get a finite, non-zero gradient",
        )
    model.zero_grad()


def padding_invariance(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """4. An example's outputs alone and padded inside a batch with a longer one agree."""
    if "attention_mask" not in batch:
        report("WARN", "padding", "the batches have no attention_mask: padding not checked")
        return
    samples = [train_set[i] for i in range(min(32, len(train_set)))]

    def collate_copies(chosen):  # a collate may pop from its samples
        return collate(copy.deepcopy(chosen))

    lengths = [int(collate_copies([s])["attention_mask"].sum()) for s in samples]
    if min(lengths) == max(lengths):
        report("WARN", "padding", "the first examples all have one length: padding not checked")
        return
    short, long = samples[lengths.index(min(lengths))], samples[lengths.index(max(lengths))]
    alone_batch = send_to_device(collate_copies([short]), accelerator.device)
    padded_batch = send_to_device(collate_copies([short, long]), accelerator.device)
    model.eval()
    with torch.no_grad():
        mine = first_tensor(step.forward(model, alone_batch))[0]
        padded = first_tensor(step.forward(model, padded_batch))[0]
    model.train()
    # Each by its own positions: a collate that pads to a fixed length pads the example alone too
    mine = mine[real_positions(model, alone_batch, mine)]
    padded = padded[real_positions(model, padded_batch, padded)]
    difference = (
        (mine.float() - padded.float()).abs().max().item()
        if mine.shape == padded.shape
        else math.inf
    )
    if difference > PADDING_TOLERANCE:
        report(
            "FAIL",
            "padding",
            f"an example's outputs change by {difference:.3g} when it is padded in a batch "
            f"(tolerance {PADDING_TOLERANCE}): is the attention_mask passed to the encoder?",
        )
    else:
        report(
            "PASS",
            "padding",
            f"outputs alone and padded agree to {difference:.1e} (tolerance {PADDING_TOLERANCE})",
        )


def real_positions(model, batch, output):
    """Which positions of the first example's `output` are its own, not padding: per token of the
    input (the attention mask), per token of the target for an encoder-decoder's decoder (its mask,
    else the labels that are not -100), all for an output per example."""
    if not output.dim():
        return slice(None)
    if getattr(model.config, "is_encoder_decoder", False):  # logits are per token of the target
        target = batch.get("decoder_attention_mask")
        target = (
            target.bool()
            if target is not None
            else batch["labels"] != -100
            if "labels" in batch
            else None
        )
        if target is not None and output.shape[0] == target.shape[1]:
            return target[0]
    elif output.shape[0] == batch["attention_mask"].shape[1]:
        return batch["attention_mask"][0].bool()
    return slice(None)


def overfit(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """5. A few dozen steps on one batch drive its loss down: else the loss is detached from the
    model, the lr is 0, or the labels have nothing to do with the inputs."""
    trained, optimizer = trainable_copy(model, args.lr)
    curve, start = [], time.monotonic()
    for _ in range(OVERFIT_STEPS):
        loss = step.forward(trained, batch).loss
        curve.append(loss.item())
        if len(curve) > 10 and min(curve[-5:]) < OVERFIT_FACTOR * curve[0] / 2:
            break  # learnt well past the bar: the remaining steps would only cost time
        if time.monotonic() - start > CHECK_SECONDS:
            break  # a large model: judged on the steps the budget allowed
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    first, last = curve[0], min(curve[-5:])
    if last < OVERFIT_FACTOR * first:
        report(
            "PASS", "overfit", f"{len(curve)} steps on one batch: loss {first:.4f} -> {last:.4f}"
        )
        next_token(report, trained, batch)
    elif len(curve) < OVERFIT_STEPS:
        report(
            "WARN",
            "overfit",
            f"{len(curve)} steps on one batch in the {CHECK_SECONDS} s budget: loss {first:.4f} "
            f"-> {last:.4f}, not yet below {OVERFIT_FACTOR:g}x; a smaller --batch_size or "
            f"--max_len lets --check take all {OVERFIT_STEPS} steps",
        )
    else:
        report(
            "FAIL",
            "overfit",
            f"{OVERFIT_STEPS} steps on one batch at --lr {args.lr}: loss {first:.4f} -> "
            f"{last:.4f}, not below {OVERFIT_FACTOR:g}x: a loss detached from the model, "
            f"an lr of 0, or a layer that cuts the gradient?",
        )


def next_token(report, model, batch):
    """5c. A causal LM that learnt one batch by heart predicts at each position the token after it.
    Labels shifted in dataset.py and again by the model teach it the token two ahead; unshifted
    labels given to a loss that does not shift them teach it to copy its input. Either way the loss
    falls and every other check passes."""
    ids = batch.get("input_ids")
    if (
        not model.can_generate()
        or getattr(model.config, "is_encoder_decoder", False)
        or ids is None
    ):
        return
    model.eval()
    with torch.no_grad():
        logits = first_tensor(step.forward(model, batch))
    model.train()
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        return
    length = ids.shape[1]
    # The positions that learnt something: those before a token with a label (a loss on the
    # response only leaves the prompt's untrained), else those before a real token.
    labels = batch.get("labels")
    after = (
        labels != -100
        if torch.is_tensor(labels) and labels.shape == ids.shape
        else batch.get("attention_mask", torch.ones_like(ids)).bool()
    )
    trained = torch.cat([after[:, 1:], torch.zeros_like(after[:, :1])], 1)
    predicted = logits.argmax(-1)
    # Of those positions, the share whose prediction is the token k positions on.
    hits = {
        k: ((predicted[:, : length - k] == ids[:, k:]) & trained[:, : length - k]).sum().item()
        / max(1, trained[:, : length - k].sum().item())
        for k in (0, 1, 2)
    }
    learnt = max(hits, key=hits.get)
    figures = f"token after: {hits[1]:.0%} right, itself: {hits[0]:.0%}, two ahead: {hits[2]:.0%}"
    if learnt == 1 or hits[learnt] < hits[1] + NEXT_TOKEN_MARGIN:
        report(
            "PASS",
            "shift",
            f"after the overfit steps each position predicts the token after it ({figures})",
        )
    elif learnt == 2:
        report(
            "FAIL",
            "shift",
            f"after the overfit steps each position predicts the token two ahead ({figures}): "
            f"the labels are shifted twice, in dataset.py and by the model's loss? Give "
            f"labels equal to input_ids (-100 where no loss): a causal LM shifts them itself",
        )
    else:
        report(
            "FAIL",
            "shift",
            f"after the overfit steps each position predicts its own input token ({figures}): "
            f"the labels are not shifted by the loss? A hand-written loss compares "
            f"logits[:, :-1] with labels[:, 1:]",
        )


def learning(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """5b. As many steps on distinct training batches lower the loss of held-out validation
    examples: else what is learnt does not carry over (labels shuffled against their inputs,
    say)."""
    trained, optimizer = trainable_copy(model, args.lr)
    valid_collate = getattr(valid_set, "collate", None) or collate
    held_out = valid_collate([valid_set[i] for i in range(min(64, len(valid_set)))])
    held_out = send_to_device(held_out, accelerator.device)
    loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    before, steps, start = evaluation_loss(trained, held_out), 0, time.monotonic()
    out_of_time = False
    while steps < OVERFIT_STEPS and not out_of_time:
        for batch in loader:
            batch = send_to_device(batch, accelerator.device)
            step.forward(trained, batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            out_of_time = time.monotonic() - start > CHECK_SECONDS
            if steps == OVERFIT_STEPS or out_of_time:
                break
    after = evaluation_loss(trained, held_out)
    if after < LEARNING_FACTOR * before:
        report(
            "PASS",
            "learning",
            f"{steps} steps on training batches: validation loss {before:.4f} -> {after:.4f}",
        )
    elif steps < OVERFIT_STEPS:
        report(
            "WARN",
            "learning",
            f"{steps} steps on training batches in the {CHECK_SECONDS} s budget: validation loss "
            f"{before:.4f} -> {after:.4f}, not yet below {LEARNING_FACTOR:g}x; a smaller "
            f"--batch_size or --max_len lets --check take all {OVERFIT_STEPS} steps",
        )
    else:
        report(
            "FAIL",
            "learning",
            f"{OVERFIT_STEPS} steps on training batches: validation loss {before:.4f} -> "
            f"{after:.4f}, not below {LEARNING_FACTOR:g}x: do the labels belong to their "
            f"inputs (shuffled or misaligned in dataset.py)? Or raise --lr",
        )


def trainable_copy(model, lr):
    """A copy of the model in train mode and an AdamW over its trainable parameters: checks train
    it."""
    trained = copy.deepcopy(model).train()
    return trained, torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)


def evaluation_loss(model, batch):
    model.eval()
    with torch.no_grad():
        loss = step.forward(model, batch).loss.item()
    model.train()
    return loss


def round_trip(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """6. save_pretrained, then from_pretrained: the same outputs, exactly (eval mode)."""
    if not accelerator.is_main_process:
        return  # transformers writes from rank 0 only: the main process checks its copy
    model.eval()
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model.save_pretrained(folder)
        loaded = (
            type(model)
            .from_pretrained(folder, trust_remote_code=False)
            .to(accelerator.device)
            .eval()
        )
        before, after = (
            first_tensor(step.forward(model, batch)),
            first_tensor(step.forward(loaded, batch)),
        )
    model.train()
    if before.shape != after.shape or not torch.equal(before, after):
        difference = (
            (before - after).abs().max().item() if before.shape == after.shape else "another shape"
        )
        report(
            "FAIL",
            "round-trip",
            f"from_pretrained(save_pretrained(model)) gives other outputs ({difference}): "
            f"something the model needs is not in its config (set it in the config "
            f"class, not on the model)",
        )
    else:
        report(
            "PASS", "round-trip", "save_pretrained / from_pretrained reproduces the outputs exactly"
        )


def batch_split(report, accelerator, model, batch, train_set, valid_set, collate, args, loss_items):
    """7. One step's gradient at --batch_size B and at B/2 x --accumulation 2, each batch weighed as
    train.py weighs it (step.loss_divisors), dropout off: the same to float noise, unless the loss
    is a mean over items whose number varies between batches (tokens) and loss_items() does not
    count them."""
    if loss_items:  # a count for the whole batch would pass here and fail at the epoch's end
        try:
            per_example({"": loss_items(batch)}, "loss_items(batch)", batch)
        except UserError as e:
            report("FAIL", "split", str(e.code).removeprefix("error: "))
            return
    size = max(2, min(args.batch_size, len(train_set)))
    if len(train_set) < 2:
        report("WARN", "split", "one training example: no batch to split")
        return
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[
        :size
    ].tolist()
    samples, half = [train_set[i] for i in chosen], size // 2
    gradients = []
    for window in ([samples], [samples[:half], samples[half:]]):
        window = [
            send_to_device(collate(copy.deepcopy(part)), accelerator.device) for part in window
        ]
        trained = copy.deepcopy(model).eval()  # dropout off: the two splits would draw other masks
        divisors, _ = step.loss_divisors(window, loss_items, len(window))
        for micro, divisor in zip(window, divisors):
            (step.forward(trained, micro).loss / divisor).backward()
        gradients.append(
            torch.cat(
                [p.grad.double().flatten() for p in trained.parameters() if p.grad is not None]
            )
        )
    whole, split = gradients
    difference = ((split - whole).norm() / whole.norm().clamp(min=1e-30)).item()
    steps = f"one step at --batch_size {size} and at {half} x --accumulation 2"
    if difference <= SPLIT_TOLERANCE:
        report(
            "PASS",
            "split",
            f"{steps} give the same gradient (relative difference {difference:.1e})"
            + ("; loss_items() counts the items" if loss_items else ""),
        )
    elif loss_items is None:
        report(
            "WARN",
            "split",
            f"{steps} give gradients {difference:.1e} apart: the loss is a mean over "
            f"items (tokens?) whose number varies between batches (add loss_items(batch) "
            f"to modeling.py, per example the items its loss is a mean over, and "
            f"train.py weighs every item of a step alike), or it takes a softmax over "
            f"padded positions (the hub's ...ForQuestionAnswering: pad every batch to one "
            f"length in collate)",
        )
    else:
        report(
            "WARN",
            "split",
            f"{steps} give gradients {difference:.1e} apart although loss_items() "
            f"counts items: does it count exactly what the loss is a mean over (a causal "
            f"LM predicts every token but the first)?",
        )


def metrics(
    report, accelerator, model, batch, train_set, valid_set, collate, args, tokenizer, hooks
):
    """7b. metric_inputs() and compute_metrics() on two validation batches, as validation calls them
    (eval mode, no gradients, the unwrapped model): per-example tensors that train.py can gather
    from every process, of one shape apart from the batch dimension, and finite metrics."""
    metric_inputs, compute_metrics = (
        getattr(hooks, name, None) for name in ("metric_inputs", "compute_metrics")
    )
    if not (metric_inputs and compute_metrics):
        report(
            "PASS",
            "metrics",
            "no metric_inputs() and compute_metrics(): validation reports the loss only",
        )
        return
    valid_collate = getattr(valid_set, "collate", None) or collate
    size = min(args.batch_size, max(1, len(valid_set) // 2))
    gathered, shapes, examples = {}, set(), 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, min(2 * size, len(valid_set)), size):
                chosen = [valid_set[i] for i in range(start, min(start + size, len(valid_set)))]
                part, size_now = (
                    send_to_device(valid_collate(chosen), accelerator.device),
                    len(chosen),
                )
                values = metric_inputs(model, tokenizer, part, step.forward(model, part))
                for key, value in values.items():
                    if not torch.is_tensor(value) or not value.dim() or len(value) != size_now:
                        shape = (
                            tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                        )
                        report(
                            "FAIL",
                            "metrics",
                            f"metric_inputs() gave '{key}' of shape {shape} for a batch of "
                            f"{size_now}: it must give a tensor per example (first dimension "
                            f"{size_now}), which train.py gathers from every process",
                        )
                        return
                    shapes.add((key, tuple(value.shape[1:])))
                    gathered.setdefault(key, []).append(value)
                examples += size_now
    finally:
        model.train()
    if len(shapes) != len(gathered):
        report(
            "FAIL",
            "metrics",
            f"metric_inputs() gives tensors of other shapes in other batches "
            f"({', '.join(f'{k} {s}' for k, s in sorted(shapes))}): per example, return "
            f"scores or counts of a fixed size (not tokens of a batch's length)",
        )
        return
    values = compute_metrics({key: torch.cat(parts) for key, parts in gathered.items()})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())
    report(
        "PASS" if finite else "FAIL",
        "metrics",
        f"on {examples} validation examples: {shown}"
        + ("" if finite else ": a metric is not a finite number"),
    )


def one_line_per_row(predictions, merge=None):
    """(row, prediction dict) pairs in order -> (row, its line): the several examples of one row
    (consecutive) merged by `merge` (modeling.merge_predictions) where there is one, else listed
    under "examples". predict.py writes these lines; the predict check runs the same."""
    for row, group in itertools.groupby(predictions, key=lambda pair: pair[0]):
        group = [prediction for _, prediction in group]
        yield row, merge(group) if merge else group[0] if len(group) == 1 else {"examples": group}


def predict_mode(report, accelerator, model, batch, train_set, valid_set, collate, args, *more):
    """7c. predict.py's path on the first rows of --valid_file: generate_dataset(predicting=True),
    predictions() one dict per example that json can write, and where examples carry their input
    row ("row": a row that gives several examples), one line per row: merge_predictions() of the
    row's dicts, or the dicts listed. `more`: the tokenizer, modeling.py, generate_dataset."""
    tokenizer, hooks, generate = more
    predictions = getattr(hooks, "predictions", None)
    if not (predictions and generate):
        report("PASS", "predict", "no predictions(): predict.py writes the raw outputs")
        return
    data = generate(
        args.valid_file,
        args.valid_split,
        tokenizer,
        args,
        getattr(train_set, "labels", None),
        predicting=True,
    )
    chosen = [data[i] for i in range(min(args.batch_size, len(data)))]
    part = send_to_device((getattr(data, "collate", None) or collate)(chosen), accelerator.device)
    model.eval()
    try:
        with torch.no_grad():
            dicts = predictions(model, tokenizer, part, step.forward(model, part))
    finally:
        model.train()
    if len(dicts) != len(chosen):
        report(
            "FAIL",
            "predict",
            f"predictions() gave {len(dicts)} dicts for {len(chosen)} "
            f"examples: give one per example",
        )
        return
    rows = part.get("row")
    rows = rows.tolist() if torch.is_tensor(rows) else rows
    if rows is None:
        lines = dicts
    elif list(rows) != sorted(rows) or not all(isinstance(r, int) for r in rows):
        report(
            "FAIL",
            "predict",
            f"the batch's \"row\" must be the input rows' numbers, ints in "
            f"order (a row's examples next to each other), not {str(rows)[:80]}",
        )
        return
    else:
        merge = getattr(hooks, "merge_predictions", None)
        lines = [line for _, line in one_line_per_row(zip(rows, dicts), merge)]
    try:
        first = json.dumps(lines[0], ensure_ascii=False)
    except (TypeError, ValueError) as e:
        report(
            "FAIL",
            "predict",
            f"a prediction json cannot write ({e}): give numbers, strings, "
            f"lists, dicts (tensor.tolist())",
        )
        return
    grouped = f" of {len(lines)} rows" if rows is not None else ""
    report(
        "PASS",
        "predict",
        f"{len(chosen)} examples{grouped} -> {len(lines)} lines, the first: {first[:100]}",
    )


def throughput(report, accelerator, model, batch, train_set, valid_set, collate, args):
    """8. Per batch: the time to load it against the time of a training step."""
    loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.num_workers or 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    trained, optimizer = trainable_copy(model, args.lr)
    load_time = step_time = 0.0
    batches, began, count = iter(loader), time.monotonic(), 0
    # Up to 8 batches, fewer on a model whose step takes seconds (2 at least: the first warms up)
    while count < min(8, len(loader)) and (count < 2 or time.monotonic() - began < SPEED_SECONDS):
        count += 1
        start = time.perf_counter()
        batch = send_to_device(next(batches), accelerator.device)
        loaded = time.perf_counter()
        step.forward(trained, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        load_time, step_time = load_time + loaded - start, step_time + time.perf_counter() - loaded
    verdict = "WARN" if load_time > step_time else "PASS"
    hint = (
        ": the data loader is the bottleneck (--num_workers, or tokenize in generate_dataset, not "
        "in __getitem__)"
        if load_time > step_time
        else ""
    )
    report(
        verdict,
        "speed",
        f"per batch of {args.batch_size}: loading {1000 * load_time / count:.1f} ms, training "
        f"step {1000 * step_time / count:.1f} ms{hint}",
    )


def processes(report, accelerator, model, train_set, collate, args):
    """9. With several processes: each sees other batches, and one DDP step leaves the weights
    equal."""
    loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    ddp_model, optimizer = trainable_copy(model, args.lr)
    ddp_model, optimizer, loader = accelerator.prepare(ddp_model, optimizer, loader)
    batch = next(iter(loader))
    first = next(v for v in batch.values() if torch.is_tensor(v))
    digests = accelerator.gather(
        torch.tensor([hash(first.cpu().numpy().tobytes()) % (1 << 62)], device=accelerator.device)
    )
    accelerator.backward(step.forward(ddp_model, batch).loss)
    optimizer.step()
    weights = torch.stack(
        [p.detach().double().sum() for p in accelerator.unwrap_model(ddp_model).parameters()]
    ).sum()
    sums = accelerator.gather(weights[None])
    distinct = len(set(digests.tolist())) == accelerator.num_processes
    report(
        "PASS" if distinct else "FAIL",
        "processes",
        f"{accelerator.num_processes} processes see {'different' if distinct else 'THE SAME'} "
        "batches",
    )
    same = bool((sums == sums[0]).all())
    report(
        "PASS" if same else "FAIL",
        "processes",
        f"weights after one step are {'identical' if same else 'DIFFERENT'} on every process"
        + ("" if same else ": gradients are not all-reduced (a parameter outside DDP?)"),
    )
