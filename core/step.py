"""What one optimizer step does: what of a batch goes into forward(), the micro-batches of a step
(--accumulation), how each one's loss is weighted (modeling.loss_items), the non-finite skip for
every optimizer, the running loss, and what the loop shows (progress bars, samples, the
tracker)."""

import contextlib
import functools
import inspect
import math
import time

import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from core.checkpoint import is_optimizer, is_scheduler
from utils import UserError


def forward(model, batch):
    """model(**batch): every tensor of the batch, and a value that is not a tensor (gold strings,
    offsets, row numbers: what collate() hands the hooks alongside) only if forward() names it as a
    parameter (a **kwargs does not take them)."""
    if all(torch.is_tensor(value) for value in batch.values()):
        return model(**batch)
    named = forward_parameters(type(extract_model_from_parallel(model, keep_torch_compile=False)))
    return model(**{k: v for k, v in batch.items() if torch.is_tensor(v) or k in named})


@functools.cache
def forward_parameters(model_type):
    """The names forward() of `model_type` takes one by one (not *args or **kwargs)."""
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    parameters = inspect.signature(model_type.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in kinds)


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


def no_sync(accelerator, model):
    """The context of a window's batches before its last: no all-reduce of their gradients (DDP,
    FSDP2). DeepSpeed's engine decides that itself from the boundary that backward() sets."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def backward(accelerator, model, loss, last):
    """One batch's backward pass; `last`: the window's last batch, after which the step is taken.
    Under DeepSpeed its engine accumulates, clips (--max_grad_norm, in its config) and steps at
    that boundary, which this loop sets (a window may be shorter than --accumulation at the end of
    an epoch; the engine's own micro-step counter would not know), and each batch's loss is already
    divided by its share of the step's items (scale_wrt_gas=False: not again by the
    accumulation)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)
        model.step()  # a no-op before the boundary
    else:
        accelerator.backward(loss)


def clip(accelerator, parameters, max_norm):
    """Clips the gradients to --max_grad_norm (0: no clipping); returns their norm before clipping,
    as a tensor on the device (inf or NaN for a step with non-finite gradients)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The engine clipped and stepped in backward(); it skipped a non-finite step (norm inf).
        # In fp16 (GPUs only, never run here) its loss scaler skips overflowing steps and lowers
        # its scale, as GradScaler does without DeepSpeed: those are not counted as non-finite.
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        if accelerator.mixed_precision == "fp16":
            norm = 0.0
        return torch.tensor(math.nan if norm is None else float(norm), device=accelerator.device)
    norm = accelerator.clip_grad_norm_(parameters, max_norm or math.inf)
    if isinstance(norm, DTensor):  # FSDP2: replicated on every process
        norm = norm.full_tensor()
    return norm


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
    """What the loop counts, kept on the device and read only every --log_every steps and at saves
    (each read waits for the GPU): this process's loss sums of the epoch in progress (losses times
    their items, and the items: a mean over tokens with modeling.loss_items, else over batches),
    the same since the last log with the tokens and samples that went through (throughput), and
    the non-finite steps not yet reported. `saved`: the checkpoint's numbers of each process."""

    def __init__(self, accelerator, saved=None):
        self.accelerator, device = accelerator, accelerator.device
        mine = list(saved[accelerator.process_index]) if saved else []
        mine += [0.0] * (6 - len(mine))  # a checkpoint from before the log window holds 2 numbers
        self.epoch = torch.tensor(mine[:2], dtype=torch.float64, device=device)  # loss sum, items
        self.window = torch.tensor(mine[2:5], dtype=torch.float64, device=device)  # ... and tokens
        self.samples = int(mine[5])  # known on the host (batch shapes): no transfer
        self.nonfinite_steps = torch.zeros((), dtype=torch.float64, device=device)
        self.start = self.clock = time.perf_counter()
        self.totals = [0, 0.0]  # samples and tokens of the windows logged by this process's run

    def add(self, loss, items, batch, counted):
        """One micro-batch: its mean `loss` over `items` (1 without modeling.loss_items); its tokens
        are the items if `counted`, else its input tokens (attention_mask, else input_ids)."""
        finite = torch.isfinite(
            loss
        )  # a non-finite loss is left out of the mean (its step skipped)
        sums = torch.stack(
            [torch.where(finite, loss * items, 0.0).double(), (finite * items).double()]
        )
        self.epoch += sums
        self.window[:2] += sums
        if counted:
            tokens = items
        elif batch.get("attention_mask") is not None:  # padding left out
            tokens = batch["attention_mask"].sum()
        else:
            tokens = batch["input_ids"].numel() if batch.get("input_ids") is not None else 0
        self.window[2] += tokens
        self.samples += len(next(iter(batch.values())))

    def nonfinite(self):
        """The non-finite steps since the last call (the same on every process): one read."""
        count = int(self.nonfinite_steps.item())
        self.nonfinite_steps.zero_()
        return count

    def read_window(self):
        """[loss sum, items, tokens, samples] since the last log, summed over every process."""
        window = torch.cat([self.window, self.window.new_tensor([self.samples])])
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        return window.tolist()

    def since_log(self):
        """(mean loss or None, samples/s, tokens/s) since the last log, over every process (a
        collective: every process calls it); starts the next window."""
        loss_sum, items, tokens, samples = self.read_window()
        now = time.perf_counter()
        elapsed, self.clock = max(now - self.clock, 1e-9), now
        self.window.zero_()
        self.samples = 0
        self.totals = [self.totals[0] + samples, self.totals[1] + tokens]
        loss = loss_sum / items if items else None
        return loss, samples / elapsed, tokens / elapsed

    def per_process(self):
        """[[the 6 numbers] of each process], for the checkpoint (a collective)."""
        mine = torch.cat([self.epoch, self.window, self.window.new_tensor([self.samples])])
        return self.accelerator.gather(mine[None]).tolist()

    def epoch_mean(self):
        """The mean over every process's items of the epoch; then starts the next epoch's sums."""
        totals = self.accelerator.reduce(self.epoch.clone(), reduction="sum")
        mean = (totals[0] / totals[1]).item()
        self.epoch.zero_()
        return mean

    def summary(self, steps):
        """The closing line: wall time, samples/s and tokens/s of this run (since it started or
        resumed), and the peak memory on a GPU (a collective)."""
        _, _, tokens, samples = self.read_window()
        wall = time.perf_counter() - self.start
        samples, tokens = self.totals[0] + samples, self.totals[1] + tokens
        line = (
            f"{steps} optimizer steps in {wall:.1f} s: {samples / wall:.1f} samples/s, "
            f"{tokens / wall:.0f} tokens/s"
        )
        if self.accelerator.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
            line += f", peak memory {peak:.2f} GiB (process {self.accelerator.process_index})"
        return line


def progress(accelerator, iterable, desc, **kwargs):
    """A tqdm bar on the main process only: `[Epoch 0] [TRAIN]:  12%|█▏  | 520/4387 [..., loss=2.56,
    lr=7.8e-6]`."""
    return tqdm(
        iterable, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True, **kwargs
    )


def show_samples(accelerator, format_samples, model, tokenizer, batch, outputs, k, step, bar):
    """--sample_every: modeling.py's format_samples() on the main process, in eval mode, without
    gradients, with the RNG streams restored afterwards: showing samples (even with generate())
    changes nothing. Under FSDP2 and DeepSpeed every process runs it (under FSDP2 and ZeRO-3 each
    forward gathers the shards from all of them); the main one prints."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if not (accelerator.is_main_process or sharded):
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
