"""What a checkpoint holds on disk, written whole and read back without pickles.

A checkpoint directory holds what from_pretrained needs (config.json, model.safetensors, tokenizer
files) plus what exact resume needs: optimizer.pt, lr.bin (scheduler), NAME.pt for train.py's other
`objects`, trainer_state.json (position, best value, log), one rng_state_<rank>.safetensors per
process, and manifest.json (the sha256 of every file). save() writes it into a staging folder and
publishes it by renames; tensors are loaded with weights_only=True, the rest is JSON. The order in
which a resumed run reads it back is resume.restore().
"""

import glob
import json
import os
import pickle
import random
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import safetensors
import torch
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from utils import UserError, sha256


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next (or the one in progress)
    steps_done_in_epoch: int = 0  # optimizer steps already taken in that epoch
    global_step: int = 0
    best_metric: float | None = (
        None  # the best value of --metric_for_best so far (what best/ holds)
    )
    bad_epochs: int = 0  # epochs since it last improved, for --early_stopping_patience
    num_processes: int = 1
    distributed_type: str = "NO"  # how those processes ran: NO, MULTI_CPU, MULTI_GPU, FSDP
    threads: int = 0  # torch's CPU threads per process: another number sums floats in another order
    skipped_steps: int = 0  # --skip_nonfinite: steps skipped in the current epoch
    loss_sums: list = field(
        default_factory=list
    )  # per process: [loss sum, batches] of the epoch in progress
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # which run: an outdir holds one
    data: dict = field(default_factory=dict)  # what the data was: rows and fingerprint of each file
    log: dict = field(default_factory=dict)  # what log.json holds


def read_state(directory):
    """trainer_state.json of a checkpoint, checked: one line naming the file if it is damaged."""
    path = Path(directory) / "trainer_state.json"
    try:
        values = json.loads(path.read_text())
        state = TrainState(**values)
    except (OSError, ValueError, TypeError) as e:  # missing, not JSON, unknown or missing keys
        raise UserError(
            f"{path}: not a trainer_state.json of this template ({str(e).splitlines()[0][:200]}). "
            f"Resume from another checkpoint."
        ) from None
    for f in fields(TrainState):
        value, kind = getattr(state, f.name), f.type if f.type in (int, str, list, dict) else None
        if f.name == "best_metric":
            kind = (float, int, type(None))
        if kind and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise UserError(
                f"{path}: {f.name} is {value!r}, not a {f.type}. Resume from another checkpoint."
            )
    return state


def find(path):
    """Where the checkpoint `path` is: itself, or `.old-<name>` beside it if the run died between
    the two renames of publish() (verify() then moves it back)."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    return old if not path.exists() and (old / "manifest.json").is_file() else path


# What a checkpoint must hold for a resume (and from_pretrained): never published without them.
REQUIRED = {"config.json", "model.safetensors", "my_config.json", "trainer_state.json"}


def verify(path, option="--resume", recover=True):
    """Checks the checkpoint at `path` against its manifest (every file whole and unchanged), once,
    on the main process, before it is read; takes back a checkpoint a crash left as .old-<name>."""
    path = Path(path)
    if recover and find(path) != path:
        os.replace(find(path), path)
    other = path.with_name("last" if path.name == "best" else "best")
    if not (path / "manifest.json").is_file():
        raise UserError(
            f"{option} {path}: not a checkpoint of this template (no manifest.json). "
            f"Give a checkpoint directory such as model/last."
        )
    try:
        files = json.loads((path / "manifest.json").read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
            raise TypeError("'files' is not a mapping of names to digests")
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{option} {path}: {path / 'manifest.json'} is damaged ({e}). Use another checkpoint, "
            f"e.g. {other}."
        ) from None
    for name in sorted(REQUIRED - set(files)):  # a manifest rewritten to leave a file out
        raise UserError(
            f"{option} {path}: manifest.json does not list {name}. Use another checkpoint, e.g. "
            f"{other}."
        )
    for name, digest in files.items():
        parts = Path(name).parts  # a file, or one in DeepSpeed's folder: nothing outside `path`
        inside = len(parts) == 1 or (len(parts) == 2 and parts[0] == DEEPSPEED_FOLDER)
        if not inside or not (path / name).is_file() or sha256(path / name) != digest:
            raise UserError(
                f"{option} {path}: {path / name} is missing, truncated or changed since it was "
                f"saved (it does not match manifest.json). Use another checkpoint, e.g. {other}."
            )


def written_here(path):
    """Whether `path` (last/, best/ or log.json in an outdir) is something this template wrote."""
    if path.name == "log.json":
        try:
            log = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(log, dict) and all(key.startswith(("Epoch ", "Step ")) for key in log)
    return (path / "manifest.json").is_file()


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
    metadata = {
        "numpy": json.dumps([kind, pos, has_gauss, gauss]),
        "python": json.dumps([version, gauss_next]),
    }
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
    np.random.set_state(
        (kind, tensors.pop("numpy_keys").numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, gauss_next = json.loads(header["python"])
    random.setstate((version, tuple(tensors.pop("python").tolist()), gauss_next))


def tree(directory):
    """The files of `directory` and of its folders, in order."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file())


def fsync_tree(directory):
    """fsync every file of `directory` (a staging folder this template wrote), then its folders."""
    folders = sorted(p for p in Path(directory).rglob("*") if p.is_dir())
    for path in [*tree(directory), *folders, Path(directory)]:
        fsync(path)


def fsync(path):
    """fsync one file or folder (a folder: its entries, so renames in it last)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging, target):
    """Replaces `target` by the complete directory `staging`. A crash at any moment leaves either
    `target` or `.old-<target>` whole; verify() takes the latter back."""
    old = target.with_name(f".old-{target.name}")
    discard(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync(target.parent)  # the renames; never the outdir's other entries (a FIFO would hang)
    discard(old)


def discard(old):
    """Removes a previous checkpoint that publish() moved aside: a folder, or a link (rmtree leaves
    a link in place, and the next save's rename onto it would fail). One that cannot be emptied (on
    NFS a file another process holds open stays as .nfsXXXX until it is closed) is renamed aside
    to .old-<name>.<n>, said in one line, and removed by a later save once it can be."""
    for leftover in sorted(old.parent.glob(f"{glob.escape(old.name)}.*")):  # earlier ones
        shutil.rmtree(leftover, ignore_errors=True)
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        aside = old.with_name(f"{old.name}.{uuid.uuid4().hex[:8]}")
        os.replace(old, aside)
        print(
            f"{aside}: could not be removed ({', '.join(p.name for p in aside.iterdir())} "
            f"left in it, held open?); set aside, a later save removes it.",
            file=sys.stderr,
        )


# Where each object of train.py's `objects` is saved: today's names for the optimizer and the
# scheduler (checkpoints saved before the objects were a dict resume as they are), NAME.pt for
# others.
FILES = {"optimizer": "optimizer.pt", "scheduler": "lr.bin"}
# Under DeepSpeed the optimizer state is its engine's: every process's partition, written and read
# by DeepSpeed (save_checkpoint / load_checkpoint) in this folder of the checkpoint.
DEEPSPEED_FOLDER = "deepspeed"


def file_of(name):
    return FILES.get(name, f"{name}.pt")


def is_optimizer(value):
    """A torch optimizer, or accelerate's wrapper of one (of DeepSpeed's too, which is not)."""
    return isinstance(value, torch.optim.Optimizer)


def is_scheduler(value):
    return isinstance(getattr(value, "scheduler", value), torch.optim.lr_scheduler.LRScheduler)


def save(accelerator, outdir, names, model, tokenizer, objects, args, state, replacing=False):
    """Writes one checkpoint, publishes it as outdir/<name> for each of `names` (last, and best),
    and log.json.

    `objects`: {name: anything with state_dict() / load_state_dict()} (optimizer, scheduler, the
    fp16 scaler, an EMA ...), each saved as file_of(name). Every process writes its files into a
    staging directory; the main process adds manifest.json (the sha256 of every file), fsyncs, and
    only then swaps it in by renames. A failed write (disk full, whatever exception it comes as) or
    a process that died stops every process with one message and the previous checkpoints untouched.
    `replacing`: the first save of an --overwrite run, which then removes what the previous run left
    (its best/), once this checkpoint is in place."""
    outdir = Path(outdir)
    staging = outdir / ".staging"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # what a crash during an earlier save left
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        error = write_files(accelerator, staging, model, tokenizer, objects, args, state)
        try:
            failed = accelerator.gather(
                torch.tensor([int(error is not None)], device=accelerator.device)
            ).any()
        except Exception as e:  # a peer that died: the collective fails
            raise UserError(
                f"could not save a checkpoint into {outdir}: another process stopped "
                f"({str(e).splitlines()[0][:200]}). The previous checkpoints in {outdir} are "
                f"intact: --resume {outdir}/last."
            ) from None
        if failed:
            reason = (
                str(error).splitlines()[0][:300] if error else "a write failed on another process"
            )
            raise UserError(
                f"could not write a checkpoint into {staging} ({reason}). The previous checkpoints "
                f"in {outdir} are intact: free some space, then --resume {outdir}/last."
            )
        if accelerator.is_main_process:
            publish_all(outdir, staging, names, state)
    except (
        BaseException
    ):  # a write error, a second Ctrl-C: no half-written staging folder stays behind
        if accelerator.is_main_process:
            for folder in (staging, *(outdir / f".staging-{name}" for name in names[1:])):
                shutil.rmtree(folder, ignore_errors=True)
        raise
    if (
        accelerator.is_main_process
        and replacing
        and "best" not in names
        and written_here(outdir / "best")
    ):
        shutil.rmtree(
            outdir / "best"
        )  # the previous run's: this run's best/ comes with its first epoch
    accelerator.wait_for_everyone()


def write_files(accelerator, staging, model, tokenizer, objects, args, state):
    """Every process writes its part of the checkpoint into `staging`; returns the exception a write
    raised, or None."""
    # A collective under FSDP2 and DeepSpeed ZeRO-3: every rank calls it (ZeRO-3 gives None on
    # all but the main process)
    weights = accelerator.get_state_dict(model) or {}
    weights = {
        k.removeprefix("_orig_mod."): v for k, v in weights.items()
    }  # --torch_compile's wrapper
    sharded = accelerator.distributed_type == DistributedType.FSDP
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # An optimizer's state: under FSDP2 each process its shard (nothing gathered), under DeepSpeed
    # its engine's files (below), else whole on the main process alone (computed there only: the
    # others would discard it). Other objects are the same on every process (a scheduler, a
    # scaler, an EMA of replicated weights): the main process saves them.
    states = {
        name: optimizer_state(model, value, sharded) if is_optimizer(value) else value.state_dict()
        for name, value in objects.items()
        if (accelerator.is_main_process or (sharded and is_optimizer(value)))
        and not (deepspeed and is_optimizer(value))
    }
    try:
        if deepspeed:  # every process (a collective): its partition of the optimizer state
            model.save_checkpoint(staging, tag=DEEPSPEED_FOLDER, client_state={}, save_latest=False)
            # DeepSpeed adds scripts for turning its files into weights; model.safetensors holds
            # them already, and a checkpoint of this template carries no code.
            if accelerator.is_main_process:
                for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                    (staging / script).unlink(missing_ok=True)
        if sharded:
            for name in [
                name for name in states if is_optimizer(objects[name])
            ]:  # a list: the loop pops
                torch.save(
                    states.pop(name),
                    staging / f"{Path(file_of(name)).stem}_{accelerator.process_index}.pt",
                )
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model, keep_torch_compile=False), staging, weights)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, value in states.items():
                torch.save(value, staging / file_of(name))
            write_json(staging / "my_config.json", vars(args))
            write_json(staging / "trainer_state.json", asdict(state))
        tensors, metadata = rng_state()
        save_file(
            tensors,
            staging / f"rng_state_{accelerator.process_index}.safetensors",
            metadata=metadata,
        )
    except Exception as e:  # disk full is OSError from open(), RuntimeError from torch.save, ...
        return e
    return None


def publish_all(outdir, staging, names, state):
    """The main process: manifest.json, fsync, then each name published by renames, and log.json."""
    files = {p.relative_to(staging).as_posix(): sha256(p) for p in tree(staging)}
    missing = sorted(REQUIRED - set(files))
    if missing:  # save_pretrained writes nothing on a process it takes for another than the main
        raise UserError(
            f"could not save a checkpoint into {outdir}: {', '.join(missing)} were not written, so "
            f"nothing was published (the previous checkpoints are intact). Was the model saved "
            f"from the main process? Check how the processes were launched."
        )
    manifest = {"global_step": state.global_step, "files": files}
    write_json(staging / "manifest.json", manifest)
    fsync_tree(staging)
    for name in names[1:]:  # best/ shares last/'s files as hard links: nothing is written in place
        copy = outdir / f".staging-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(staging, copy, copy_function=os.link)
        publish(copy, outdir / name)
    publish(staging, outdir / names[0])
    write_json(outdir / "log.json", state.log)


def load_weights(directory, accelerator, model):
    """The checkpoint's weights into the prepared model (under FSDP2: sharded as it is), refusing
    those of another architecture. model.safetensors is in the plain layout of from_pretrained: with
    LoRA its base weights load under the adapters' .base_layer names (the adapters themselves came
    with load_adapter()), and a tied weight is stored once."""
    path = Path(directory) / "model.safetensors"
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    tied = {n for n, _ in unwrapped.named_parameters(remove_duplicate=False)} - {
        n for n, _ in unwrapped.named_parameters()
    }
    wanted = {
        name.replace(".base_layer.", "."): name
        for name in unwrapped.state_dict()
        if ".lora_" not in name and name not in tied
    }
    try:
        with safe_open(path, "pt") as f:
            stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
            missing, unexpected = (
                sorted(set(wanted) - set(stored)),
                sorted(set(stored) - set(wanted) - tied),
            )
            shapes = dict(unwrapped.state_dict())
            wrong = [
                n
                for n in sorted(set(wanted) & set(stored))
                if list(shapes[wanted[n]].shape) != stored[n]
            ]
            if missing or unexpected or wrong:
                raise RuntimeError(
                    f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
                )
            weights = {wanted[name]: f.get_tensor(name) for name in wanted}
    except (OSError, RuntimeError, safetensors.SafetensorError) as e:
        raise UserError(
            f"--resume {directory}: its weights do not fit the model that modeling.py builds "
            f"({str(e).splitlines()[0][:300]}). Resume with the modeling.py and options it was "
            f"trained with."
        ) from None
    set_model_state_dict(
        model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def save_model(model, directory, weights):
    """save_pretrained, and with LoRA adapters both halves: save_pretrained alone would write only
    the adapters (adapter_model.safetensors, adapter_config.json), so the base model and the head
    are written as well, in the plain layout: Model.from_pretrained(dir), then
    .load_adapter(dir)."""
    model.save_pretrained(directory, state_dict=weights)
    if getattr(model, "_hf_peft_config_loaded", False):
        plain = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
        model._hf_peft_config_loaded = False
        try:
            # save_original_format=False: the key renames load_adapter() recorded (a
            # base_model.model. prefix) would otherwise be applied to these plain keys too.
            model.save_pretrained(directory, state_dict=plain, save_original_format=False)
        finally:
            model._hf_peft_config_loaded = True


def optimizer_state(model, optimizer, sharded):
    """The optimizer state as plain tensors keyed by parameter name: whole (optimizer.pt), or under
    FSDP2 this process's shard of each tensor (optimizer_<rank>.pt: its rows of dim 0)."""
    optimizer = getattr(
        optimizer, "optimizer", optimizer
    )  # accelerate's wrapper, or one not prepared
    if not sharded:
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True)
        )
    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=False)
    )
    return {
        "state": {
            name: {
                k: v.to_local().cpu() if isinstance(v, DTensor) else v for k, v in values.items()
            }
            for name, values in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def load_optimizer_state(directory, name, accelerator, model, optimizer, saved_processes):
    """Loads optimizer.pt (file_of(name)), or its shards: as they are when FSDP2 runs on as many
    processes again, else joined into the whole state, which set_optimizer_state_dict reshards (or
    not) as this run is."""
    directory, whole_file = Path(directory), Path(directory) / file_of(name)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if whole_file.is_file():
        whole = load_tensors(whole_file)
    else:
        files = [directory / f"{whole_file.stem}_{rank}.pt" for rank in range(saved_processes)]
        for path in files:
            if not path.is_file():
                raise UserError(
                    f"--resume {directory}: {path} is missing: the optimizer state is incomplete. "
                    "Resume from another checkpoint."
                )
        if (
            accelerator.distributed_type == DistributedType.FSDP
            and saved_processes == accelerator.num_processes
        ):
            shard = load_tensors(files[accelerator.process_index])
            parameters = dict(model.named_parameters())
            shard["state"] = {
                name: {
                    k: DTensor.from_local(
                        v.to(parameters[name].device),
                        parameters[name].device_mesh,
                        parameters[name].placements,
                        shape=parameters[name].shape,
                        stride=parameters[name].stride(),
                    )
                    if v.dim() and isinstance(parameters[name], DTensor)
                    else v
                    for k, v in values.items()
                }
                for name, values in shard["state"].items()
            }
            set_optimizer_state_dict(
                model, optimizer, shard, options=StateDictOptions(full_state_dict=False)
            )
            return
        shards = [
            load_tensors(path) for path in files
        ]  # FSDP2 shards dim 0 in rank order: join them
        whole = {
            "param_groups": shards[0]["param_groups"],
            "state": {
                name: {
                    k: torch.cat([s["state"][name][k] for s in shards]) if v.dim() else v
                    for k, v in values.items()
                }
                for name, values in shards[0]["state"].items()
            },
        }
    set_optimizer_state_dict(
        model, optimizer, whole, options=StateDictOptions(full_state_dict=True)
    )


def load_deepspeed(directory, model):
    """Under DeepSpeed: its engine's weights and optimizer state, as it saved them on as many
    processes. DeepSpeed reads its files with torch.load(weights_only=False), which runs whatever a
    pickle holds: each file is first read here with weights_only=True (DeepSpeed's few classes
    allowed), so one that holds code is refused before DeepSpeed opens it."""
    folder = Path(directory) / DEEPSPEED_FOLDER
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals(
        [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    ):
        for path in sorted(folder.glob("*.pt")):
            load_tensors(path)
    try:
        loaded, _ = model.load_checkpoint(
            directory,
            tag=DEEPSPEED_FOLDER,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # lr.bin, as without DeepSpeed
        )
    except Exception as e:  # ZeRORuntimeException, AssertionError, KeyError ... : DeepSpeed's own
        loaded, reason = None, ": ".join([type(e).__name__, *str(e).splitlines()[:1]])[:200]
    else:
        reason = "nothing was loaded"
    if loaded is None:
        raise UserError(
            f"--resume {directory}: DeepSpeed could not load its state from {folder} ({reason}). "
            f"Resume with the DeepSpeed config (ZeRO stage) and number of processes it was saved "
            f"with."
        )


def load_tensors(path):
    """torch.load that unpickles tensors and plain containers only: a file that would run code is
    refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        # torch's own message goes on to suggest weights_only=False, which would run the pickle's
        # code.
        raise UserError(
            f"{path}: refused to load: it holds Python objects, not only tensors and numbers, and "
            f"loading them could run code. This template never writes such a file: the checkpoint "
            f"was made or changed elsewhere."
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UserError(
            f"{path}: damaged, it cannot be read ({str(e).splitlines()[0][:200]})."
        ) from None
