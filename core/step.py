"""What one optimizer step does: the micro-batches of a step (--accumulation), how each one's loss
is weighted (modeling.loss_items), the non-finite skip for every optimizer, the running loss, and
what the loop shows (progress bars, samples, the tracker)."""

import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from core.checkpoint import is_optimizer, is_scheduler
from utils import UserError


def windows(batches, accumulation):
    """The micro-batches of each optimizer step, as lists of `accumulation` (the epoch's last may be
    shorter): a step's items are counted before its first backward."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == accumulation:
            yield window
            window = []
    if window:
        yield window


def loss_divisors(window, loss_items, accumulation, accelerator=None):
    """(divisors, items): each micro-batch's loss of `window` is divided by its divisor before
    backward(), and weighs `items` in the logged mean. With modeling.loss_items (the loss is a mean
    over tokens, say), every item of the optimizer step weighs the same, over the window and over
    `accelerator`'s processes (one all-reduce of a count, no wait for the GPU; DDP then averages the
    processes' gradients): the update of --batch_size 16 is that of 8 x --accumulation 2 or of 2
    processes x 8. Without it every micro-batch weighs the same, as accelerate has it: exact for a
    mean over examples in batches of one size."""
    if loss_items is None:
        return [accumulation] * len(window), [1] * len(window)
    items = [loss_items(batch).sum() for batch in window]
    total, processes = torch.stack(items).sum(), 1
    if accelerator is not None and accelerator.num_processes > 1:
        total, processes = accelerator.reduce(total, reduction="sum"), accelerator.num_processes
    return [total / (count * processes) for count in items], items


def optimizer_step(objects, grad_norm, scaler=None, model=None):
    """Steps every optimizer of `objects` (train.py's: {name: object}) unless the gradients (their
    norm) are not finite, then every LR scheduler, zeroes the gradients, and updates every
    AveragedModel (an EMA of the weights, --ema_decay) from `model`. Returns 1 for a step
    skipped that way, else 0, as a tensor on the device: counting waits for nothing.

    fp16's GradScaler skips such steps itself (and lowers its scale). An optimizer that takes a
    found_inf flag (torch's fused Adam, AdamW, SGD, Adagrad) skips on the device, without the host
    looking; any other optimizer is asked by one read of the flag (a wait for the GPU)."""
    nonfinite = (~torch.isfinite(grad_norm)).float()
    optimizers = [value for value in objects.values() if is_optimizer(value)]
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if scaler is not None:  # it reads the gradients itself
            optimizer.step()
        elif getattr(inner, "_step_supports_amp_scaling", False):  # a fused kernel reads found_inf
            inner.found_inf = nonfinite
            optimizer.step()
        elif not nonfinite.item():
            optimizer.step()
    for scheduler in (value for value in objects.values() if is_scheduler(value)):
        scheduler.step()
    for optimizer in optimizers:
        optimizer.zero_grad()
    for average in (value for value in objects.values() if isinstance(value, AveragedModel)):
        average.update_parameters(model)
    return nonfinite if scaler is None else torch.zeros_like(nonfinite)


class RunningLoss:
    """The training loss of the epoch in progress (this process's sum of losses times their items,
    and the items: a mean over tokens with modeling.loss_items, else over batches) and the number of
    skipped non-finite steps, kept on the device: reading them waits for the GPU, so they are read
    only when shown, every --log_every steps."""

    def __init__(self, device, saved=(0.0, 0)):
        self.sum = torch.tensor(saved[0], dtype=torch.float64, device=device)
        self.items = torch.tensor(saved[1], dtype=torch.float64, device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.float64, device=device)
        self.shown = (float(saved[0]), float(saved[1]))  # the sums when last shown

    def add(self, loss, items=1):
        finite = torch.isfinite(
            loss
        )  # a non-finite loss is left out of the mean (and its step skipped)
        self.sum += torch.where(finite, loss * items, 0.0)
        self.items += finite * items

    def since_shown(self):
        """(mean loss since the last call or None, non-finite steps since the last call): one
        read."""
        total, items, nonfinite = torch.stack([self.sum, self.items, self.nonfinite_steps]).tolist()
        (shown_total, shown_items), self.shown = self.shown, (total, items)
        self.nonfinite_steps.zero_()
        return (
            (total - shown_total) / (items - shown_items) if items > shown_items else None
        ), int(nonfinite)

    def per_process(self, accelerator):
        """[[sum, items] of each process], for the checkpoint (a collective: every process calls
        it)."""
        return accelerator.gather(torch.stack([self.sum, self.items])[None]).tolist()

    def epoch_mean(self, accelerator):
        """The mean over every process's items of the epoch; then starts the next epoch's sums."""
        totals = accelerator.reduce(torch.stack([self.sum, self.items]), reduction="sum")
        mean = (totals[0] / totals[1]).item()
        self.sum.zero_()
        self.items.zero_()
        self.shown = (0.0, 0.0)
        return mean


def progress(accelerator, iterable, desc, **kwargs):
    """A tqdm bar on the main process only: `[Epoch 0] [TRAIN]:  12%|█▏  | 520/4387 [..., loss=2.56,
    lr=7.8e-6]`."""
    return tqdm(
        iterable, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True, **kwargs
    )


def show_samples(accelerator, format_samples, model, tokenizer, batch, outputs, k, step, bar):
    """--sample_every: modeling.py's format_samples() on the main process, in eval mode, without
    gradients, with the RNG streams restored afterwards: showing samples (even with generate())
    changes nothing. Under FSDP every process runs it (each forward gathers the shards from all of
    them); the main one prints."""
    if not (accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP):
        return
    unwrapped = accelerator.unwrap_model(model).eval()
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        samples = format_samples(unwrapped, tokenizer, batch, outputs, k)
    unwrapped.train()
    if accelerator.is_main_process:
        bar.write(f"--- samples at step {step}:\n" + "\n".join(samples[:k]))


def tracker(name):
    """--report_to NAME, checked: accelerate silently drops a tracker whose package is missing."""
    if name and name not in [str(t) for t in get_available_trackers()]:
        raise UserError(
            f"--report_to {name}: the {name} package is not installed. pip install {name}"
        )
    return name
