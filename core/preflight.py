"""The checks every run makes on the user files before (and while) it trains: a forward() without a
scalar loss, a --max_len beyond the model's positions or a --metric_for_best that no metric has
cost seconds, not an epoch."""

import inspect

import numpy
import torch
from accelerate.utils import send_to_device
from torch.distributed.fsdp import FSDPModule

from utils import UserError

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
                inspect.signature(hook).bind(*parameters.split(", "))
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


def first_batch(model, train_set, valid_set, args, metrics, device=torch.device("cpu")):
    """Before any training: the first validation examples and the longest training example through
    the model, so that a forward without a scalar loss, a --max_len beyond the model's positions or
    a --metric_for_best that no metric has costs seconds, not an epoch. Returns whether a greater
    --metric_for_best is better. Changes nothing: eval mode, no gradients, RNG kept. `metrics`:
    (batch, outputs) -> {name: value}, modeling.py's metrics on one batch; `device`: the model's."""
    collate = getattr(valid_set, "collate", torch.utils.data.default_collate)
    samples = [valid_set[i] for i in range(min(2, len(valid_set)))]
    lengths = getattr(train_set, "lengths", None)
    samples += [train_set[int(lengths.argmax())]] if lengths is not None else []
    batch = send_to_device(collate(samples), device)
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            outputs = model(**batch)
        except (RuntimeError, IndexError) as e:
            longest = f"the longest, {int(lengths.max())} tokens, " if lengths is not None else ""
            raise UserError(
                f"Model.forward() failed on a batch of validation and training examples ({longest}"
                f"--max_len {args.max_len}): {str(e).splitlines()[0][:300]}. If the model has fewer "
                f"positions, lower --max_len."
            ) from None
        loss_of(model, batch, outputs)
        names = ["loss", *metrics(batch, outputs)]
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


def loss_of(model, batch, outputs):
    """One clear line for a forward() whose loss is missing or not a scalar."""
    loss = getattr(outputs, "loss", None)
    if loss is None:
        parameters = inspect.signature(
            type(getattr(model, "module", model)).forward
        ).parameters  # DDP: .module
        swallowed = [k for k in batch if k not in parameters]
        hint = (
            f" The batch's keys {', '.join(swallowed)} are not parameters of forward() and went into its "
            f"**{next(p.name for p in parameters.values() if p.kind is p.VAR_KEYWORD)}: is one of them "
            f"meant as the labels?"
            if swallowed and any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            else ""
        )
        raise UserError(
            "Model.forward() returned no loss: return a ModelOutput with .loss set (see modeling.py)."
            + hint
        )
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise UserError(
            f"Model.forward() returned a loss of shape {shape}: it must be a scalar tensor (reduce it, "
            f"e.g. with .mean())."
        )
