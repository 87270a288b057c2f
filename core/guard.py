"""What a run refuses before it starts: a folder that asks to run its own code, an --outdir that
holds something of someone else's or another run (and the lock that keeps one run per outdir), and
resumed training data that changed since the checkpoint, an engine the checkpoints were never
tested with (DeepSpeed)."""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import datasets
from accelerate.utils import DistributedType

from core.checkpoint import find, read_state, written_here
from utils import UserError, data_sha256, disk_full, load_rows


def refuse_folders_with_code(args):
    """The folders of --model_name_or_path and --resume, checked by refuse_custom_code()."""
    for folder, option in [
        (args.model_name_or_path, "--model_name_or_path"),
        (args.resume, "--resume"),
    ]:
        if folder and Path(folder).is_dir():
            refuse_custom_code(folder, option)


def refuse_deepspeed(accelerator):
    """DeepSpeed keeps the optimizer state in its engine, which the checkpoint code never ran against."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError(
            "DeepSpeed is not supported by this template: FSDP2 is its sharded engine "
            "(configs/accelerate/fsdp.yaml; tested sharded on CPU, with exact resume)."
        )


def refuse_fp16_on_cpu(accelerator):
    """accelerate runs --mixed_precision fp16 on a CPU in float32 (no autocast, no loss scaler): said,
    not run silently."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16 on a CPU: accelerate would run it in float32 (no fp16 "
            "autocast or loss scaling on CPU). Use --mixed_precision bf16, which runs on CPU, "
            "or no (set in `accelerate config` too)."
        )


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
                f"{what} {folder}: {name} asks to run code that came with the folder (auto_map); this "
                f"template never runs such code. Use a folder without custom code."
            )


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
                f"runs: remove the link (or copy the checkpoint in its place), or pick another --outdir."
            )
    held = [name for name in ("last", "best", "log.json") if (outdir / name).exists()]
    foreign = [name for name in held if not written_here(outdir / name)]
    if foreign:
        raise UserError(
            f"--outdir {outdir} holds {', '.join(foreign)}, which this template did not write (no "
            f"manifest.json, or not a log.json of train.py); it never replaces what it did not write. "
            f"Move {'them' if len(foreign) > 1 else 'it'}, or pick another --outdir."
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
            f"--resume {outdir}/last, start over with --overwrite (the old run is replaced once the "
            f"new one has saved a checkpoint), or pick another --outdir."
        )


@contextlib.contextmanager
def datasets_cache_space():
    """A full disk under the datasets cache while the data is read, tokenized or its vocabulary
    learnt: one line naming the folder, and the temporary files datasets left there (tmpXXXX, from a
    map cut short) removed; the next run with room starts them afresh."""
    cache, start = Path(datasets.config.HF_DATASETS_CACHE), time.time() - 1
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        for path in cache.rglob("tmp*"):  # written since this run started, never finished
            if path.is_file() and path.stat().st_mtime >= start:
                path.unlink()
        raise UserError(
            f"no space left on the device of the datasets cache {cache} while reading or "
            f"tokenizing the data. Free space there, or set HF_DATASETS_CACHE to a folder "
            f"with room, and run again."
        ) from None


def check_writable(outdir):
    """One line, before any work, if --outdir cannot be created or written (read-only, no permission,
    a path too long); a folder created for the test is removed again."""
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
        f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
        f"{' '.join(sys.argv)}\n"
    )
    lock.flush()
    HELD_LOCKS[key] = lock


def describe_data(path, split, config_name, rows):
    """What a data file or hub split is, for the checkpoint to record: its number of examples and a
    fingerprint (the sha256 of a local file's bytes; for a hub dataset, the datasets library's own)."""
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
            f"than {saved['train']['path']} had ({saved['train']['rows']} examples). Resume with the "
            f"data it was trained on, or add --ignore_mismatch (the run is then not the one it continues)."
        )
    if saved.get("valid") and not same(saved["valid"], now["valid"]):
        print(
            f"changed on resume: the validation data ({now['valid']['path']}, {now['valid']['rows']} examples)",
            file=sys.stderr,
        )
