"""What happens to the processes: how many CPU threads each gets, the signals that stop a run
(preemption), a group restarted by torchrun's agent, a peer that died, the launches that are
refused (fp16 on a CPU), FSDP2 and DeepSpeed on CPU processes, printing once, and how a run ends."""

import ctypes
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
)

from core.checkpoint import find, read_state
from utils import UserError

# Started by `accelerate launch` (it sets ACCELERATE_MIXED_PRECISION) or torchrun: the launcher's
# end is the job's end. A plain `python train.py` (under nohup, say) outlives its shell as usual.
LAUNCHED = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


PARENT = os.getppid()


def say(line):
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)


def cpu_threads(accelerator):
    """Torch threads for this process. On CPU under `accelerate launch`, which gives each process
    one (OMP_NUM_THREADS=1, a single process too), every core is used: physical cores / processes on
    this machine, unless the user chose (OMP_NUM_THREADS set, or --num_cpu_threads_per_process)."""
    if accelerator.device.type == "cpu" and LAUNCHED and not threads_chosen_by_user():
        import psutil  # an accelerate dependency

        cores = min(psutil.cpu_count(logical=False) or os.cpu_count(), len(os.sched_getaffinity(0)))
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return torch.get_num_threads()


def threads_chosen_by_user():
    """Whether the launcher was started with OMP_NUM_THREADS or --num_cpu_threads_per_process: its
    own environment and command line, as the user gave them (Linux /proc; elsewhere: assume they
    chose)."""
    try:
        environment = Path(f"/proc/{PARENT}/environ").read_bytes().split(b"\0")
        command = Path(f"/proc/{PARENT}/cmdline").read_bytes()
    except OSError:
        return True
    return (
        any(v.startswith(b"OMP_NUM_THREADS=") for v in environment)
        or b"--num_cpu_threads_per_process" in command
    )


def refuse_lone_processes(accelerator):
    """A launcher that started N processes of which accelerate made N runs of one process each (a
    config with use_cpu: true, such as configs/accelerate/fsdp_cpu.yaml, on a machine without GPUs
    and without ACCELERATE_USE_CPU=1): each would believe it is the main process and write the
    same checkpoints. One line, from the first process; the others exit quietly."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= accelerator.num_processes:
        return
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    raise UserError(
        f"the launcher started {world} processes, but accelerate made each a run of its own "
        f"({accelerator.num_processes} process, no process group): on a machine without GPUs, "
        f"set ACCELERATE_USE_CPU=1 before `accelerate launch` (as configs/accelerate/"
        f"fsdp_cpu.yaml says), or launch one process."
    )


DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"  # a DEEPSPEED config launched


def deepspeed_handlers():
    """Before the Accelerator is made: what a DeepSpeed launch on CPU processes needs that
    accelerate and DeepSpeed do not do themselves (configs/accelerate/deepspeed_zero*_cpu.yaml).
    Returns the Accelerator's kwargs_handlers."""
    if not DEEPSPEED or torch.cuda.is_available():
        return []
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        # accelerate would drop DeepSpeed without a word and train plain DDP: another run.
        raise UserError(
            "a DeepSpeed config was launched with ACCELERATE_USE_CPU set: accelerate would drop "
            "DeepSpeed and run plain DDP. Unset it (DS_ACCELERATOR=cpu is DeepSpeed's own way; "
            "see configs/accelerate/deepspeed_zero2_cpu.yaml)."
        )
    import deepspeed.comm  # noqa: F401  (makes deepspeed.comm.torch importable by name)

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when the process group
    # starts (~3 minutes on 2 cores, fatal without a C++ compiler); gloo does the same work without
    # it (weights bitwise equal with and without the op). `deepspeed.comm.torch` is reached through
    # sys.modules: deepspeed.comm has an attribute named `torch` (the torch module).
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    # Without an explicit backend accelerate starts no process group of its own on CPU (it counts
    # 1 process and rank 0 on every rank) while DeepSpeed sees them all.
    return [InitProcessGroupKwargs(backend="gloo")]


def check_deepspeed(accelerator, args, resumed=None):
    """After the Accelerator: a DeepSpeed launch runs under DeepSpeed, with this run's clipping
    (--max_grad_norm: DeepSpeed's engine clips, from its config), and without
    what it cannot keep."""
    if DEEPSPEED and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(
            f"a DeepSpeed config was launched but accelerate runs {accelerator.distributed_type}: "
            f"DeepSpeed is not installed here (pip install deepspeed) or ACCELERATE_USE_CPU is "
            f"set. Nothing was run."
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if resumed and (resumed.distributed_type == "DEEPSPEED") != deepspeed:
        raise UserError(
            f"--resume {args.resume}: saved {'under' if not deepspeed else 'without'} DeepSpeed, "
            f"whose optimizer state is {'its engine' if not deepspeed else 'torch'}'s: resume it "
            f"{'with the DeepSpeed config' if not deepspeed else 'without DeepSpeed, as'} it was "
            f"saved with, or start from its weights (--model_name_or_path {args.resume})."
        )
    if deepspeed and resumed and resumed.num_processes != accelerator.num_processes:
        raise UserError(
            f"--resume {args.resume}: saved by {resumed.num_processes} processes under DeepSpeed, "
            f"whose optimizer state is partitioned among them: resume on "
            f"{resumed.num_processes} processes, or start from its weights (--model_name_or_path "
            f"{args.resume})."
        )
    if not deepspeed:
        return
    for option, value in (("--ema_decay", args.ema_decay), ("--torch_compile", args.torch_compile)):
        if value:  # an EMA of ZeRO-3's partitioned weights would average placeholders
            raise UserError(f"{option} is not supported under DeepSpeed; drop it (or use FSDP2).")
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm or 0.0  # 0: none
    if not plugin.zero3_init_flag:
        # accelerate 1.15 tells transformers that ZeRO-3 is on whatever zero3_init_flag says, and
        # transformers then builds every model partitioned (zero.Init): build_model()'s code would
        # see empty weights. Off as the config asks: the engine partitions the model in prepare().
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if plugin.deepspeed_config.get("gradient_accumulation_steps") not in (1, "auto"):
        raise UserError(
            "the DeepSpeed config sets gradient_accumulation_steps: set it to 1 and pass "
            "--accumulation to train.py, which accumulates itself."
        )


def refuse_fp16_on_cpu(accelerator):
    """accelerate runs --mixed_precision fp16 on a CPU in float32 (no autocast, no loss scaler):
    said, not run silently."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16 on a CPU: accelerate would run it in float32 (no fp16 "
            "autocast or loss scaling on CPU). Use --mixed_precision bf16, which runs on CPU, "
            "or no (set in `accelerate config` too)."
        )


def shard_fsdp_on_cpu(accelerator):
    """FSDP2 on CPU processes (configs/accelerate/fsdp_cpu.yaml, for anyone to run, and what the
    tests run): accelerate maps an FSDP config to plain DDP when there is no GPU, though torch's
    fully_shard runs on a CPU device mesh over gloo. Shard as the config asks (its settings are in
    the ACCELERATE_FSDP_* variables that accelerate launch set)."""
    if (
        accelerator.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP") == "true"
    ):
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


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
            # A scheduler or `kill` often signals only the top process, `accelerate launch`, which
            # then dies and leaves this process training on unseen: have the kernel send SIGTERM
            # when it goes.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != PARENT:  # it was gone before we asked
                self.handler(signal.SIGTERM, None)

    def handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise UserError(
                f"stopped at once by a second Ctrl-C; {self.outdir}/last is the last checkpoint "
                f"that was saved whole (if any): --resume {self.outdir}/last"
            )
        if signum == signal.SIGINT:
            os.write(
                2,
                b"\nCtrl-C: finishing this step and saving last/ (Ctrl-C again to stop at once)\n",
            )
        elif not self.signal:  # said at once: the save may be a few steps or a validation away
            name, world = signal.Signals(signum).name, int(os.environ.get("WORLD_SIZE", 1))
            said = (
                f"{name}: finishing the step (or validation) in progress, then saving last/"
                if world == 1
                else f"{name} (process {os.environ.get('RANK', 0)}): the processes stop together "
                f"at the next multiple of --log_every steps (or after the validation in progress), "
                f"then save last/"
            )
            os.write(2, f"\n{said}\n".encode())
        self.signal = signum

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def received(self, accelerator):
        """The signal number once any process got one (the same answer on every process), else 0."""
        if accelerator.num_processes == 1:
            return self.signal
        return int(accelerator.gather(torch.tensor([self.signal], device=accelerator.device)).max())


def join_restarted_group():
    """In a group that torchrun's agent started again (--max_restarts, TORCHELASTIC_RESTART_COUNT >
    0): the default process group, joined under a key prefix of its own. Written by hand because
    torch's static rendezvous (accelerate launch's default) hands every restart the same TCPStore,
    where the dead processes' gloo addresses (NCCL ids) are still found: the new processes then
    connect to those (Connection refused) or wait for ever, about 1 restart in 3 on 2 CPU
    processes."""
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
        f"{Path(outdir) / 'last'} is the last whole checkpoint (step "
        f"{read_state(last).global_step})"
        if (last / "trainer_state.json").is_file()
        else "no checkpoint was saved yet"
    )
    print(
        f"error: another process of this run stopped (process {accelerator.process_index} saw its "
        f"connection close mid-step); {where}. Continue with: "
        f"{resume_command(accelerator, outdir)} (or the same command with --resume auto).",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


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
