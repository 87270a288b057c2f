"""Checkpoints that resume bitwise and survive a crash, and the output folder they live in.

A checkpoint directory holds what from_pretrained needs (config.json, model.safetensors, tokenizer
files) plus what exact resume needs: optimizer.pt, lr.bin (scheduler), trainer_state.json
(position, best loss, log) and one rng_state_<rank>.safetensors per process. Nothing in it is
unpickled: tensors are loaded with weights_only=True, the rest is JSON.
"""
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file

from utils import UserError


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next (or the one in progress)
    steps_done_in_epoch: int = 0  # optimizer steps already taken in that epoch
    global_step: int = 0
    best_metric: float | None = None  # the best value of --metric_for_best so far (what best/ holds)
    bad_epochs: int = 0  # epochs since it last improved, for --early_stopping_patience
    num_processes: int = 1
    skipped_steps: int = 0  # --skip_nonfinite: steps skipped in the current epoch
    loss_sums: list = field(default_factory=list)  # per process: [loss sum, batches] of the epoch in progress
    log: dict = field(default_factory=dict)  # what log.json holds


def find(path):
    """Where the checkpoint `path` is: itself, or `.old-<name>` beside it if the run died between the
    two renames of publish() (verify() then moves it back)."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    return old if not path.exists() and (old / "manifest.json").is_file() else path


def verify(path):
    """Checks the checkpoint at `path` against its manifest (every file whole and unchanged), once,
    on the main process, before it is read; takes back a checkpoint a crash left as .old-<name>."""
    path = Path(path)
    if find(path) != path:
        os.replace(find(path), path)
    if not (path / "manifest.json").is_file():
        raise UserError(f"--resume {path}: not a checkpoint of this template (no manifest.json). "
                        f"Give a checkpoint directory such as model/last.")
    with open(path / "manifest.json") as f:
        files = json.load(f)["files"]
    for name, digest in files.items():
        if not (path / name).is_file() or sha256(path / name) != digest:
            raise UserError(f"--resume {path}: {path / name} is missing, truncated or changed since it was "
                            f"saved (it does not match manifest.json). Resume from another checkpoint, e.g. "
                            f"{path.with_name('last' if path.name == 'best' else 'best')}.")


def check_outdir(outdir, resume, overwrite):
    outdir = Path(outdir)
    held = [name for name in ("last", "best", "log.json") if (outdir / name).exists()]
    if held and not resume and not overwrite:
        raise UserError(f"--outdir {outdir} already holds a run ({', '.join(held)}). Continue it with "
                        f"--resume {outdir}/last, start over with --overwrite, or pick another --outdir.")


HELD_LOCKS = {}  # outdir -> the open lock file of this process's run into it


def lock_outdir(outdir):
    """Makes OUTDIR/.lock this run's for as long as the process lives: a second run into the same
    folder is refused, naming the holder. The lock is the kernel's (flock), so a run that died holds
    none: its stale .lock file is simply taken over."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"--outdir {outdir} is a file; give a folder (it is created if missing).")
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
        raise UserError(f"--outdir {outdir} is in use by another run ({holder}). Wait for it to end, stop it, "
                        f"or pick another --outdir.") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
               f"{' '.join(sys.argv)}\n")
    lock.flush()
    HELD_LOCKS[key] = lock


def clear_outdir(accelerator, outdir):
    """For --overwrite: remove the previous run's outputs (only those) before the first save."""
    if accelerator.is_main_process:
        for name in ("last", "best", ".old-last", ".old-best", ".staging", ".staging-best"):
            shutil.rmtree(Path(outdir) / name, ignore_errors=True)
        (Path(outdir) / "log.json").unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def write_json(path, value):
    """Writes via a temporary file and a rename, so a reader never sees half a file."""
    temporary = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(temporary, "w") as f:
        json.dump(value, f, indent=4, ensure_ascii=False)
        f.write("\n")
    os.replace(temporary, path)


def rng_state():
    """This process's RNG streams as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(python_state, dtype=torch.int64)
    metadata = {"numpy": json.dumps([kind, pos, has_gauss, gauss]), "python": json.dumps([version, gauss_next])}
    return tensors, metadata


def set_rng_state(path):
    """Restores what rng_state() saved."""
    with safe_open(path, "pt") as f:
        header, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    torch.set_rng_state(tensors.pop("torch"))
    cuda = sorted(k for k in tensors if k.startswith("cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for k in cuda:
        tensors.pop(k)
    kind, pos, has_gauss, gauss = json.loads(header["numpy"])
    np.random.set_state((kind, tensors.pop("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = json.loads(header["python"])
    random.setstate((version, tuple(tensors.pop("python").tolist()), gauss_next))


def fsync_tree(directory):
    for path in [*Path(directory).iterdir(), Path(directory)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(staging, target):
    """Replaces `target` by the complete directory `staging`. A crash at any moment leaves either
    `target` or `.old-<target>` whole; verify() takes the latter back."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_tree(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def save(accelerator, outdir, names, model, tokenizer, optimizer, scheduler, args, state):
    """Writes one checkpoint, publishes it as outdir/<name> for each of `names` (last, and best), and log.json.

    Every process writes its files into a staging directory; the main process adds manifest.json
    (the sha256 of every file), fsyncs, and only then swaps it in by renames. A failed write (disk
    full) on any process stops every process with the previous checkpoints untouched."""
    outdir = Path(outdir)
    staging = outdir / ".staging"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # what a crash during an earlier save left
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed: every rank calls it
    weights = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}  # --torch_compile's wrapper
    error = None
    try:
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model, keep_torch_compile=False), staging, weights)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "lr.bin")
            write_json(staging / "my_config.json", vars(args))
            write_json(staging / "trainer_state.json", asdict(state))
        tensors, metadata = rng_state()
        save_file(tensors, staging / f"rng_state_{accelerator.process_index}.safetensors", metadata=metadata)
    except OSError as e:
        error = e
    if accelerator.gather(torch.tensor([int(error is not None)], device=accelerator.device)).any():
        raise UserError(f"could not write a checkpoint into {staging} ({error or 'on another process'}). "
                        f"The previous checkpoints in {outdir} are intact: free some space, then --resume "
                        f"{outdir}/last.")
    if accelerator.is_main_process:
        manifest = {"global_step": state.global_step,
                    "files": {p.name: sha256(p) for p in sorted(staging.iterdir())}}
        write_json(staging / "manifest.json", manifest)
        fsync_tree(staging)
        for name in names[1:]:  # best/ shares last/'s files as hard links: nothing is written in place
            copy = outdir / f".staging-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(staging, copy, copy_function=os.link)
            publish(copy, outdir / name)
        publish(staging, outdir / names[0])
        write_json(outdir / "log.json", state.log)
    accelerator.wait_for_everyone()


def load_weights(directory, model):
    """Loads a checkpoint's weights into the freshly built model, refusing one of another architecture."""
    try:
        load_model(model, Path(directory) / "model.safetensors", strict=True)
    except (RuntimeError, FileNotFoundError) as e:
        raise UserError(f"--resume {directory}: its weights do not fit the model that modeling.py builds "
                        f"({str(e).splitlines()[0][:300]}). Resume with the modeling.py and options it was "
                        f"trained with.") from None


def save_model(model, directory, weights):
    """save_pretrained, and with LoRA adapters both halves: save_pretrained alone would write only
    the adapters (adapter_model.safetensors, adapter_config.json), so the base model and the head
    are written as well, in the plain layout: Model.from_pretrained(dir), then .load_adapter(dir)."""
    model.save_pretrained(directory, state_dict=weights)
    if getattr(model, "_hf_peft_config_loaded", False):
        plain = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
        model._hf_peft_config_loaded = False
        try:
            # save_original_format=False: the key renames load_adapter() recorded (a base_model.model.
            # prefix) would otherwise be applied to these plain keys too.
            model.save_pretrained(directory, state_dict=plain, save_original_format=False)
        finally:
            model._hf_peft_config_loaded = True


def load_training_state(directory, accelerator, optimizer, scheduler, ignore_mismatch):
    """Restores optimizer, scheduler and position; the RNG comes last, in restore_rng()."""
    directory = Path(directory)
    with open(directory / "trainer_state.json") as f:
        state = TrainState(**json.load(f))
    if state.num_processes != accelerator.num_processes and not ignore_mismatch:
        raise UserError(f"--resume {directory}: saved by {state.num_processes} process(es), resumed with "
                        f"{accelerator.num_processes}. Launch with --num_processes {state.num_processes}, or "
                        f"add --ignore_mismatch (data order and results then differ).")
    optimizer.load_state_dict(load_tensors(directory / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors(directory / "lr.bin"))
    state.num_processes = accelerator.num_processes
    return state


def load_tensors(path):
    """torch.load that unpickles tensors and plain containers only: a file that would run code is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load, it holds more than tensors and numbers "
                        f"({str(e).splitlines()[0][:200]}). Only load checkpoints you trust.") from None


def restore_rng(directory, accelerator):
    path = Path(directory) / f"rng_state_{accelerator.process_index}.safetensors"
    if path.is_file():
        set_rng_state(path)
