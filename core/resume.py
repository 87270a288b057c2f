"""Is this the same run, and where does it continue? --resume auto and "finished", the options that
must match the checkpoint's, the outdir that holds one run (ownership, the lock), the training
data's fingerprint, the restore order (weights, objects, position, RNG streams last), another number
of processes (elastic accumulation), and the data order: a function of (seed, epoch) only, so that a
resumed epoch replays the same batches."""

import fcntl
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from core.checkpoint import (
    file_of,
    find,
    is_optimizer,
    is_scheduler,
    load_deepspeed,
    load_optimizer_state,
    load_tensors,
    load_weights,
    read_state,
    set_rng_state,
    written_here,
)
from core.processes import say
from utils import UserError, data_sha256, load_rows

# ---------------------------------------------------------------- the options


# Options a resumed run does not take over from the checkpoint's my_config.json (--outdir: the
# checkpoint's own folder, wherever it has been copied, unless given).
NOT_RESUMED = {
    "resume",
    "config",
    "overwrite",
    "stop_after_steps",
    "ignore_mismatch",
    "outdir",
    "check",
}


# Options that must equal the checkpoint's for the resumed run to be the run that was never stopped.
# Any other option given anew is allowed and printed as "changed on resume".
MUST_MATCH = [
    "model_name_or_path",
    "batch_size",
    "accumulation",
    "seed",
    "max_len",
    "lr",
    "weight_decay",
    "max_grad_norm",
    "lr_scheduler_type",
    "num_warmup_steps",
    "skip_nonfinite",
    "ema_decay",
    "mixed_precision",
    "torch_compile",
    "group_by_length",
    "metric_for_best",
    "greater_is_better",
    "freeze_backbone",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "dataset_config",
    "train_split",
]


def compare_options(saved, args, directory):
    """The options of a resumed run against the checkpoint's my_config.json (`saved`): one that
    MUST_MATCH and differs is refused (unless --ignore_mismatch); any other is said in one line."""
    changed = []
    for key, value in saved.items():
        if key in NOT_RESUMED or not hasattr(args, key) or getattr(args, key) == value:
            continue
        if key in MUST_MATCH and not args.ignore_mismatch:
            raise UserError(
                f"--{key} {getattr(args, key)} differs from {directory}'s {value}, so the "
                f"resumed run would not continue the same run. Drop the option, or add "
                f"--ignore_mismatch to resume anyway (data order and results then differ)."
            )
        changed.append(f"--{key} {value} -> {getattr(args, key)}")
    if changed:
        say(f"changed on resume: {', '.join(changed)}")


def auto_checkpoint(outdir):
    """--resume auto: OUTDIR/last if --outdir holds a checkpoint (so the same command continues a
    run, as a scheduler's requeue or torchrun's restart runs it again), else None: a new run. Said
    in one line."""
    last = Path(outdir) / "last"
    if not (find(last) / "trainer_state.json").is_file():
        say(f"--resume auto: {outdir} holds no checkpoint: a new run.")
        return None
    say(f"--resume auto: continuing {last} (step {read_state(find(last)).global_step}).")
    return last


def finished(state, args):
    """Whether the resumed run has nothing left (every epoch or --max_steps done, or stopped
    early): (what it reached, what to pass to train further), else None. Other training data
    (another task's outdir, say) is refused first, not declared finished."""
    saved, path = state.data.get("train", {}), Path(args.train_file)
    if saved.get("sha256") and path.is_file() and not args.ignore_mismatch:
        if data_sha256(path) != saved["sha256"]:
            raise UserError(
                f"--resume {args.resume}: the training data changed since the checkpoint was "
                f"saved: {path} is not the file {saved['path']} was ({saved['rows']} examples; "
                f"another sha256). Resume with the data it was trained on, add --ignore_mismatch "
                f"(the run is then not the one it continues), or give another --outdir."
            )
    patience = args.early_stopping_patience
    if patience and state.bad_epochs >= patience:
        what = f"early stopping: {state.bad_epochs} validations without a better value"
        return what, "Pass a larger --early_stopping_patience to train further."
    if args.max_steps and state.global_step >= args.max_steps:
        what = f"step {state.global_step} of --max_steps {args.max_steps}"
        return what, "Pass a larger --max_steps to train further."
    if not args.max_steps and state.epoch >= args.epochs:
        return (
            f"epoch {state.epoch} of --epochs {args.epochs}",
            "Pass a larger --epochs to train further.",
        )
    return None


# ---------------------------------------------------------------- the outdir


def check_outdir(outdir, resume, resumed, overwrite):
    """Before anything is read or written: the outdir can be written, holds nothing of anyone else's
    and no links among its checkpoints, and no run other than the one --resume continues (`resumed`:
    its TrainState; --overwrite replaces a run only once the new one has saved its first checkpoint:
    see save())."""
    outdir = Path(outdir)
    if int(os.environ.get("RANK", 0)) == 0:
        check_writable(outdir)
    if resume and Path(resume).is_symlink():
        raise UserError(
            f"--resume {resume} is a symbolic link (to {os.readlink(resume)}): resume from "
            f"{Path(resume).resolve()} itself, and choose where this run goes with --outdir."
        )
    for name in ("last", "best", ".old-last", ".old-best"):
        if (outdir / name).is_symlink():
            raise UserError(
                f"--outdir {outdir}: {name} is a symbolic link (to {os.readlink(outdir / name)}). "
                f"Checkpoints are replaced by renames, which would move the link and mix two "
                "runs: remove the link (or copy the checkpoint in its place), or pick another "
                "--outdir."
            )
    held = [name for name in ("last", "best", "log.json") if (outdir / name).exists()]
    foreign = [name for name in held if not written_here(outdir / name)]
    if foreign:
        raise UserError(
            f"--outdir {outdir} holds {', '.join(foreign)}, which this template did not write (no "
            "manifest.json, or not a log.json of train.py); it never replaces what it did not "
            f"write. Move {'them' if len(foreign) > 1 else 'it'}, or pick another --outdir."
        )
    if (
        resume
        and (outdir / "last").exists()
        and Path(resume).resolve() != (outdir / "last").resolve()
    ):
        if read_state(find(outdir / "last")).run_id != resumed.run_id:
            raise UserError(
                f"--outdir {outdir} holds another run than the one --resume {resume} continues: "
                f"resuming there would mix the two. Give another --outdir (by default the folder "
                f"the checkpoint is in)."
            )
    elif held and not resume and not overwrite:
        raise UserError(
            f"--outdir {outdir} already holds a run ({', '.join(held)}). Continue it with "
            f"--resume {outdir}/last, start over with --overwrite (the old run is replaced once "
            "the new one has saved a checkpoint), or pick another --outdir."
        )


def check_writable(outdir):
    """One line, before any work, if --outdir cannot be created or written (read-only, no
    permission, a path too long); a folder created for the test is removed again."""
    created = []
    try:
        for folder in [outdir, *outdir.parents][::-1]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        probe = outdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--outdir {outdir}: cannot write there ({e.strerror or e}). Pick a folder you can "
            f"write, with a shorter path if it is too long."
        ) from None
    finally:
        for folder in reversed(created):
            folder.rmdir()


HELD_LOCKS = {}  # outdir -> the open lock file of this process's run into it


def lock_outdir(outdir):
    """Makes OUTDIR/.lock this run's for as long as the process lives: a second run into the same
    folder is refused, naming the holder. The lock is the kernel's (flock), so a run that died holds
    none: its stale .lock file is simply taken over."""
    outdir = Path(outdir)  # not a file: parse_options() refused that
    outdir.mkdir(parents=True, exist_ok=True)
    key = str(outdir.resolve())
    if key in HELD_LOCKS:  # an earlier run of this same process (train.main() called again)
        HELD_LOCKS.pop(key).close()
    lock = open(outdir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that wrote nothing yet"
        lock.close()
        raise UserError(
            f"--outdir {outdir} is in use by another run ({holder}). Wait for it to end, stop it, "
            f"or pick another --outdir."
        ) from None
    lock.truncate(0)
    lock.write(
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n"
    )
    lock.flush()
    HELD_LOCKS[key] = lock


def check_unchanged(accelerator, directory, read):
    """Under the outdir's lock (the main process holds it): the checkpoint still holds the
    position `read` in setup(). An earlier incarnation of the run (a job submitted twice, a node
    wrongly declared dead) may have saved once more before it ended and let go of the lock: its
    newer weights at the older position would be a silent mix, so the run is refused instead."""
    accelerator.wait_for_everyone()
    now = read_state(find(directory))
    changed = torch.tensor([int(asdict(now) != asdict(read))], device=accelerator.device)
    if accelerator.gather(changed).any():
        raise UserError(
            f"--resume {directory}: saved again (step {read.global_step} -> {now.global_step}) "
            f"by another run into the same folder after this one had read it (the same job "
            f"started twice?). Nothing was done; run the command again to continue from step "
            f"{now.global_step}."
        )


# ---------------------------------------------------------------- the data


def describe_data(path, split, config_name, rows):
    """What a data file or hub split is, for the checkpoint to record: its number of examples and a
    fingerprint (the sha256 of a local file's bytes; for a hub dataset, the datasets library's
    own)."""
    if Path(path).is_file():
        return {"path": str(path), "rows": rows, "sha256": data_sha256(path)}
    return {
        "path": str(path),
        "split": split,
        "config": config_name,
        "rows": rows,
        "fingerprint": load_rows(path, split, config_name)._fingerprint,
    }


def check_data(saved, now, resume, ignore_mismatch):
    """--resume on other training data is refused (a different order, even another number of steps,
    while claiming an exact continuation); other validation data is said, not refused."""

    def same(a, b):
        return {k: v for k, v in a.items() if k != "path"} == {
            k: v for k, v in b.items() if k != "path"
        }

    if saved.get("train") and not same(saved["train"], now["train"]) and not ignore_mismatch:
        raise UserError(
            f"--resume {resume}: the training data changed since the checkpoint was saved: "
            f"{now['train']['path']} has {now['train']['rows']} examples and another fingerprint "
            f"than {saved['train']['path']} had ({saved['train']['rows']} examples). Resume with "
            "the data it was trained on, or add --ignore_mismatch (the run is then not the one it "
            "continues)."
        )
    if saved.get("valid") and not same(saved["valid"], now["valid"]):
        print(
            f"changed on resume: the validation data ({now['valid']['path']}, "
            f"{now['valid']['rows']} examples)",
            file=sys.stderr,
        )


class ShuffledSampler(torch.utils.data.Sampler):
    """A random order of the examples that is a function of (seed, epoch) only, like accelerate's
    seedable sampler (so a resumed epoch replays it), held as one int32 tensor (4 bytes an example;
    torch draws the same permutation as in int64) and handed out in chunks: the list of Python ints
    that sampler makes costs ~36 bytes an example."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def order(self):
        return torch.randperm(
            self.size,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            dtype=torch.int32 if self.size < 2**31 else torch.int64,
        )

    def __iter__(self):
        for chunk in self.order().split(1 << 12):
            yield from chunk.tolist()


class LengthGroupedSampler(ShuffledSampler):
    """--group_by_length: Trainer's order (the shuffled order cut into chunks of 50 batches, each
    sorted by length, longest first, and the longest example moved to the very front: the indices of
    transformers' get_length_grouped_indices), as a function of (seed, epoch) like ShuffledSampler,
    so that a resumed epoch replays the same batches. Written here because Trainer's makes Python
    lists of every index and length (~70 bytes an example); this one holds int32 tensors.
    `batch_size`: the examples of one optimizer step (train.py: --batch_size x --accumulation x
    processes, which take consecutive batches), so that every split of a step groups alike."""

    def __init__(self, batch_size, dataset, seed):
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise UserError(
                "--group_by_length: the Dataset of dataset.py has no `lengths` (one length per "
                "sample)."
            )
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = (
            torch.tensor(lengths, dtype=torch.int32),
            batch_size,
        )  # a copy: arrow's are read-only

    def __iter__(self):
        chunk = max(min(self.size // (self.batch_size * 4), 50), 1) * self.batch_size
        chunks = [
            c[torch.argsort(self.lengths[c], descending=True, stable=True)]
            for c in self.order().split(chunk)
        ]
        longest = int(
            torch.stack([self.lengths[c[0]] for c in chunks]).argmax()
        )  # the first, on ties
        chunks[0][0], chunks[longest][0] = int(chunks[longest][0]), int(chunks[0][0])
        for c in chunks:
            yield from c.tolist()


# ---------------------------------------------------------------- the position


def restore(directory, accelerator, model, objects, state):
    """Continues the checkpoint at `directory` (verify()ed already) in the prepared run, in the one
    order that is exact: the weights, then every object of `objects` (as save() wrote them), then
    the position `state` (read_state()) fitted to this run's number of processes, and the RNG
    streams last, so that nothing draws a number after them."""
    directory = Path(directory)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # the weights and the optimizer state, by DeepSpeed's engine
        load_deepspeed(directory, model)
    else:
        load_weights(directory, accelerator, model)
    for name, value in objects.items():
        if is_optimizer(value) and deepspeed:
            continue
        if is_optimizer(value):
            load_optimizer_state(directory, name, accelerator, model, value, state.num_processes)
            continue
        path = directory / file_of(name)
        if not path.is_file():
            raise UserError(
                f"--resume {directory}: no {path.name}: the checkpoint was saved without '{name}' "
                f"(added to train.py's objects since?). Resume from a checkpoint that has it, or "
                f"start a new run."
            )
        saved = load_tensors(path)
        if is_scheduler(value) and state.num_processes != accelerator.num_processes:
            # A prepared scheduler steps once per process at each optimizer step: count in the new
            # unit.
            saved["last_epoch"] = (
                saved["last_epoch"] // state.num_processes * accelerator.num_processes
            )
            saved["_step_count"] = saved["last_epoch"] + 1
        value.load_state_dict(saved)
    if state.num_processes != accelerator.num_processes:
        # The epoch's loss sums, all on the main process: the epoch's mean comes out the same.
        totals = [sum(column) for column in zip(*state.loss_sums)] if state.loss_sums else [0.0, 0]
        state.loss_sums = [totals] + [[0.0, 0]] * (accelerator.num_processes - 1)
    state.num_processes = accelerator.num_processes
    path = directory / f"rng_state_{accelerator.process_index}.safetensors"
    if path.is_file():  # a process that a smaller run did not have starts from the seed
        set_rng_state(path)


def elastic_accumulation(directory, saved, accumulation, processes, ignore_mismatch):
    """--accumulation for resuming on `processes` processes a run saved on `saved` processes: the
    global batch (processes x accumulation) stays, and so does the data each optimizer step takes
    (process i gets batches i, i+P, ... of the seeded order, so a step always takes the next P x
    accumulation batches). Refused when no whole accumulation keeps it."""
    if saved == processes:
        return accumulation
    batches = saved * accumulation
    if batches % processes:
        if ignore_mismatch:
            return accumulation
        counts = ", ".join(str(n) for n in range(1, batches + 1) if batches % n == 0)
        raise UserError(
            f"--resume {directory}: saved by {saved} process(es) x --accumulation {accumulation} = "
            f"{batches} batches per optimizer step, which {processes} processes cannot share; "
            f"resume with {counts} processes, or add --ignore_mismatch (the global batch then "
            "changes)."
        )
    print(
        f"resuming on {processes} process(es) instead of {saved}: --accumulation {accumulation} -> "
        f"{batches // processes}, the same {batches} batches per optimizer step",
        file=sys.stderr,
    )
    return batches // processes
