"""What a run needs around its loop: CPU threads, signals (preemption), progress bars, the running
loss, samples, trackers, LoRA adapters, the resume command and the way a run ends."""

import ctypes
import os
import signal
import sys
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from packaging import version
from tqdm.auto import tqdm

from core.checkpoint import find, read_state
from core.options import say
from utils import UserError, has_weights


def progress(accelerator, iterable, desc, **kwargs):
    """A tqdm bar on the main process only: `[Epoch 0] [TRAIN]:  12%|█▏  | 520/4387 [..., loss=2.56, lr=7.8e-6]`."""
    return tqdm(
        iterable, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True, **kwargs
    )


def show_samples(accelerator, format_samples, model, tokenizer, batch, outputs, k, step, bar):
    """--sample_every: modeling.py's format_samples() on the main process, in eval mode, without gradients,
    with the RNG streams restored afterwards: showing samples (even with generate()) changes nothing.
    Under FSDP every process runs it (each forward gathers the shards from all of them); the main one
    prints."""
    if not (accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP):
        return
    unwrapped = accelerator.unwrap_model(model).eval()
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        samples = format_samples(unwrapped, tokenizer, batch, outputs, k)
    unwrapped.train()
    if accelerator.is_main_process:
        bar.write(f"--- samples at step {step}:\n" + "\n".join(samples[:k]))


def resume_command(accelerator, outdir):
    """The full command that continues this run, launch options included."""
    launch = "accelerate launch"
    if accelerator.num_processes > 1:
        launch = f"accelerate launch --multi_gpu --num_processes {accelerator.num_processes}"
        if accelerator.num_processes > int(
            os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)
        ):
            launch += " --num_machines N --machine_rank R --main_process_ip IP (as before)"
        if accelerator.device.type == "cpu":
            launch = f"ACCELERATE_USE_CPU=1 {launch}"
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        launch = "accelerate launch --config_file (the one this run used)"
    return f"{launch} train.py --resume {outdir}/last"


def tracker(name):
    """--report_to NAME, checked: accelerate silently drops a tracker whose package is missing."""
    if name and name not in [str(t) for t in get_available_trackers()]:
        raise UserError(
            f"--report_to {name}: the {name} package is not installed. pip install {name}"
        )
    return name


# Started by `accelerate launch` (it sets ACCELERATE_MIXED_PRECISION) or torchrun: the launcher's end is
# the job's end. A plain `python train.py` (under nohup, say) outlives its shell as usual.
LAUNCHED = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


PARENT = os.getppid()


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
        """(mean loss since the last call or None, non-finite steps since the last call): one read."""
        total, items, nonfinite = torch.stack([self.sum, self.items, self.nonfinite_steps]).tolist()
        (shown_total, shown_items), self.shown = self.shown, (total, items)
        self.nonfinite_steps.zero_()
        return (
            (total - shown_total) / (items - shown_items) if items > shown_items else None
        ), int(nonfinite)

    def per_process(self, accelerator):
        """[[sum, items] of each process], for the checkpoint (a collective: every process calls it)."""
        return accelerator.gather(torch.stack([self.sum, self.items])[None]).tolist()

    def epoch_mean(self, accelerator):
        """The mean over every process's items of the epoch; then starts the next epoch's sums."""
        totals = accelerator.reduce(torch.stack([self.sum, self.items]), reduction="sum")
        mean = (totals[0] / totals[1]).item()
        self.sum.zero_()
        self.items.zero_()
        self.shown = (0.0, 0.0)
        return mean


def cpu_threads(accelerator):
    """Torch threads for this process. On CPU under `accelerate launch`, which gives each process one
    (OMP_NUM_THREADS=1, a single process too), every core is used: physical cores / processes on
    this machine, unless the user chose (OMP_NUM_THREADS set, or --num_cpu_threads_per_process)."""
    if accelerator.device.type == "cpu" and LAUNCHED and not threads_chosen_by_user():
        import psutil  # an accelerate dependency

        cores = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return torch.get_num_threads()


def threads_chosen_by_user():
    """Whether the launcher was started with OMP_NUM_THREADS or --num_cpu_threads_per_process: its own
    environment and command line, as the user gave them (Linux /proc; elsewhere: assume they chose)."""
    try:
        environment = Path(f"/proc/{PARENT}/environ").read_bytes().split(b"\0")
        command = Path(f"/proc/{PARENT}/cmdline").read_bytes()
    except OSError:
        return True
    return (
        any(v.startswith(b"OMP_NUM_THREADS=") for v in environment)
        or b"--num_cpu_threads_per_process" in command
    )


class Preemption:
    """SIGTERM and SIGUSR1 (what Slurm, Kubernetes and most schedulers send) and Ctrl-C only set a
    flag; the loop asks every --log_every steps, so the step in progress finishes and last/ is saved
    whole. A second Ctrl-C stops at once (a save in progress is abandoned: the previous checkpoint
    stays as it was)."""

    def __init__(self, outdir):
        self.signal, self.outdir = 0, outdir
        self.previous = {
            signum: signal.signal(signum, self.handler)
            for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        }
        if sys.platform == "linux" and LAUNCHED:
            # A scheduler or `kill` often signals only the top process, `accelerate launch`, which then
            # dies and leaves this process training on unseen: have the kernel send SIGTERM when it goes.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != PARENT:  # it was gone before we asked
                self.signal = signal.SIGTERM

    def handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise UserError(
                f"stopped at once by a second Ctrl-C; {self.outdir}/last is the last checkpoint that "
                f"was saved whole (if any): --resume {self.outdir}/last"
            )
        if signum == signal.SIGINT:
            os.write(
                2,
                b"\nCtrl-C: finishing this step and saving last/ (Ctrl-C again to stop at once)\n",
            )
        self.signal = signum

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def received(self, accelerator):
        """The signal number once any process got one (the same answer on every process), else 0."""
        if accelerator.num_processes == 1:
            return self.signal
        return int(accelerator.gather(torch.tensor([self.signal], device=accelerator.device)).max())


def shard_fsdp_on_cpu(accelerator):
    """FSDP2 on CPU processes (configs/accelerate/fsdp_cpu.yaml, for anyone to run, and what the tests
    run): accelerate maps an FSDP config to plain DDP when there is no GPU, though torch's fully_shard
    runs on a CPU device mesh over gloo. Shard as the config asks (its settings are in the
    ACCELERATE_FSDP_* variables that accelerate launch set)."""
    if (
        accelerator.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP") == "true"
    ):
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def step(optimizer, grad_norm, scaler=None):
    """optimizer.step(), unless the gradients (their norm) are not finite. Returns 1 for a step skipped
    that way, else 0, as a tensor on the device: counting waits for nothing.

    fp16's GradScaler skips such steps itself (and lowers its scale). An optimizer that takes a
    found_inf flag (torch's fused Adam, AdamW, SGD, Adagrad) skips on the device, without the host
    looking; any other optimizer is asked by one read of the flag (a wait for the GPU)."""
    if scaler is not None:
        optimizer.step()
        return torch.zeros((), device=grad_norm.device)
    nonfinite = (~torch.isfinite(grad_norm)).float()
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if getattr(inner, "_step_supports_amp_scaling", False):  # a fused kernel: it reads found_inf
        inner.found_inf = nonfinite
        optimizer.step()
    elif not nonfinite.item():
        optimizer.step()
    return nonfinite


def add_lora(model, args):
    """--lora_r: LoRA adapters (PEFT, through transformers' add_adapter) in the backbone, which is
    frozen; the rest of the model (the head) trains in full. On --resume the adapters are the checkpoint's."""
    try:
        import peft
    except ImportError:
        raise UserError("--lora_r needs the peft package: pip install peft") from None
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if version.parse(peft.__version__) < version.parse(MIN_PEFT_VERSION):
        raise UserError(
            f"--lora_r: transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION}, "
            f"installed {peft.__version__}. Install the tested versions: pip install -r requirements.txt "
            f"-c constraints.txt"
        )
    if not args.resume and not has_weights(
        args.model_name_or_path
    ):  # perplexity 222 against 1.8 in full
        say(
            f"warning: --lora_r on {args.model_name_or_path}, which holds no weights: its backbone is random "
            f"and stays frozen, so the adapters learn little. LoRA needs a pretrained backbone: give one (a hub "
            f"id, or the best/ of a full run), or drop --lora_r to train every weight."
        )
    backbone = {id(p) for p in model.base_model.parameters()}
    if args.resume:
        model.load_adapter(str(args.resume), is_trainable=True)
    else:
        # Every linear layer of the backbone by default: nn.Linear, and the Conv1D of GPT-2 (a linear
        # layer with its weight transposed), which PEFT adapts alike.
        linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
        targets = (
            args.lora_target_modules.split(",")
            if args.lora_target_modules
            else [
                f"{model.base_model_prefix}.{name}"
                for name, module in model.base_model.named_modules()
                if isinstance(module, linear)
            ]
        )
        if not targets:
            raise UserError(
                f"--lora_r: the backbone of {type(model).__name__} has no linear layer to adapt; name "
                f"the layers with --lora_target_modules (e.g. q_proj,v_proj)."
            )
        conv1d = any(
            isinstance(m, transformers.pytorch_utils.Conv1D) for m in model.base_model.modules()
        )
        try:
            model.add_adapter(
                peft.LoraConfig(
                    r=args.lora_r,
                    lora_alpha=args.lora_alpha,
                    fan_in_fan_out=conv1d,
                    lora_dropout=args.lora_dropout,
                    target_modules=targets,
                )
            )
        except ValueError as e:
            raise UserError(
                f"--lora_target_modules {args.lora_target_modules}: {str(e).splitlines()[0][:300]}"
            ) from None
    for param in model.parameters():
        param.requires_grad = id(param) not in backbone  # the adapters and the head


def join_restarted_group():
    """In a group that torchrun's agent started again (--max_restarts, TORCHELASTIC_RESTART_COUNT > 0):
    the default process group, joined under a key prefix of its own. Written by hand because torch's
    static rendezvous (accelerate launch's default) hands every restart the same TCPStore, where the
    dead processes' gloo addresses (NCCL ids) are still found: the new processes then connect to
    those (Connection refused) or wait for ever, about 1 restart in 3 on 2 CPU processes."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if (
        not restart
        or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or torch.distributed.is_initialized()
    ):
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
        "1",
        "true",
    )
    torch.distributed.init_process_group(
        "nccl" if gpu else "gloo",
        rank=rank,
        world_size=world_size,
        store=torch.distributed.PrefixStore(f"/restart_{restart}", store),
    )


# How a collective fails when another process of the run died (killed, out of memory, its node
# gone): gloo's socket errors, NCCL's and torch's distributed errors.
PEER_ERRORS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator",
    "Socket Timeout",
)


def peer_stopped(error):
    return isinstance(error, torch.distributed.DistError) or any(
        text in str(error) for text in PEER_ERRORS
    )


def exit_peer_stopped(accelerator, outdir):
    """One line for a process whose peer died mid-step (instead of gloo's traceback), then exit 1;
    the launcher (torchrun's agent) reports or restarts the group."""
    last = find(Path(outdir) / "last")
    where = (
        f"{Path(outdir) / 'last'} is the last whole checkpoint (step {read_state(last).global_step})"
        if (last / "trainer_state.json").is_file()
        else "no checkpoint was saved yet"
    )
    print(
        f"error: another process of this run stopped (process {accelerator.process_index} saw its "
        f"connection close mid-step); {where}. Continue with: {resume_command(accelerator, outdir)} "
        f"(or the same command with --resume auto).",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def finish(accelerator, status):
    """Ends the run (or --check) with exit status `status`."""
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Everything is saved and fsynced. Skipping interpreter shutdown avoids a rare hang or abort
        # ("terminate called without an active exception") in the process-group threads at exit,
        # seen about 1 in 30 two-process CPU runs with gloo.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)
