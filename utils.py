"""Helpers for train.py: options from files, progress bars, and checkpoints that resume bitwise."""
import csv
import ctypes
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
import yaml
from accelerate.tracking import get_available_trackers
from packaging import version
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from tqdm.auto import tqdm


class UserError(SystemExit):
    """A mistake the user can fix: Python prints the message and exits with status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------- options

# Options a resumed run does not take over from the checkpoint's my_config.json.
NOT_RESUMED = {"resume", "config", "overwrite", "stop_after_steps", "ignore_mismatch"}
# Options that must equal the checkpoint's for the resumed run to be the run that was never stopped.
# (The optimizer and scheduler settings would be overridden by the saved optimizer and lr.bin anyway.)
MUST_MATCH = ["model_name_or_path", "batch_size", "accumulation", "seed", "max_len", "lr", "weight_decay",
              "lr_scheduler_type", "num_warmup_steps", "group_by_length", "metric_for_best", "greater_is_better",
              "freeze_backbone", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"]


def read_options_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such options file.")
    with open(path) as f:
        values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option names to values.")
    return values


def parse_options(parser, argv=None):
    """Defaults < the resumed checkpoint's my_config.json < --config FILE < flags on the command line."""
    known, _ = parser.parse_known_args(argv)
    defaults, saved = {}, {}
    if known.resume:
        saved = read_options_file(checkpoint_dir(known.resume) / "my_config.json")
        defaults.update({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    if known.config:
        defaults.update(read_options_file(known.config))
    names = {action.dest for action in parser._actions}
    for key in defaults:
        if key not in names:
            source = known.config if key not in saved else f"{known.resume}/my_config.json"
            parser.error(f"{source}: unknown option '{key}'")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for key in MUST_MATCH if saved and not args.ignore_mismatch else []:
        if key in saved and getattr(args, key) != saved[key]:
            raise UserError(f"--{key} {getattr(args, key)} differs from {known.resume}'s {saved[key]}, so the "
                            f"resumed run would not continue the same run. Drop the option, or add "
                            f"--ignore_mismatch to resume anyway (data order and results then differ).")
    return args


# ---------------------------------------------------------------- data

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_rows(path, split="train", config_name=None):
    """A data file (.jsonl .json .csv .tsv .parquet .txt) or a hub dataset name as a datasets.Dataset:
    memory-mapped from the datasets cache (HF_DATASETS_CACHE), so a second run reads it back."""
    path = str(path)
    suffix = Path(path).suffix
    try:
        if suffix in FILE_TYPES:
            if not Path(path).is_file():
                raise UserError(f"{path}: no such data file. Check --train_file / --valid_file.")
            if Path(path).stat().st_size == 0:
                raise UserError(f"{path}: the file holds no examples.")
            options = {}
            if suffix in (".csv", ".tsv"):
                # Everything stays a string ("NA", "null" too), and TSV is split on tabs only:
                # GLUE-style files hold unbalanced quotes. A UTF-8 BOM is dropped by the reader.
                options = {"keep_default_na": False, "na_filter": False}
                if suffix == ".tsv":
                    options.update(delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = datasets.load_dataset(FILE_TYPES[suffix], data_files={split: path}, split=split, **options)
        elif Path(path).is_file():
            raise UserError(f"{path}: unknown file type '{suffix}'. Give a {', '.join(FILE_TYPES)} file.")
        else:
            rows = datasets.load_dataset(path, config_name, split=split)
    except datasets.exceptions.DatasetGenerationError as e:
        bad = bad_line(path)
        raise UserError(f"{path}, {bad}" if bad else f"{path}: {e.__cause__ or e}") from None
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # OSError: hub unreachable too
        if suffix in FILE_TYPES and "corresponds to no data" in str(e):
            raise UserError(f"{path}: the file holds no examples.") from None
        raise UserError(f"{path}: could not load it as a file ({', '.join(FILE_TYPES)}) or a dataset "
                        f"(split '{split}', config {config_name}): {str(e).splitlines()[0][:300]}") from None
    if len(rows) == 0:
        raise UserError(f"{path}: the file holds no examples.")
    return rows


def bad_line(path):
    """The first line of a JSON-lines file that is not a JSON object, as a message (pyarrow's error
    counts rows from its current block, not lines of the file)."""
    if Path(path).suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("a JSON value that is not an object")
            except ValueError as e:
                return f"line {number}: not a JSON object ({e}). Each line must be one object like {{\"text\": \"...\"}}."
    return None


class LengthGroupedSampler(transformers.trainer_pt_utils.LengthGroupedSampler):
    """--group_by_length: Trainer's sampler (random chunks of 50 batches, each sorted by length, the
    longest batch first), with the permutation a function of (seed, epoch) like accelerate's
    seedable sampler, so that a resumed epoch replays the same batches."""

    def __init__(self, batch_size, dataset, seed):
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise UserError("--group_by_length: the Dataset of dataset.py has no `lengths` (one length per sample).")
        super().__init__(batch_size, lengths=[int(n) for n in lengths], generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


# ---------------------------------------------------------------- display

def progress(accelerator, iterable, desc, **kwargs):
    """A tqdm bar on the main process only: `[Epoch 0] [TRAIN]:  12%|█▏  | 520/4387 [..., loss=2.56, lr=7.8e-6]`."""
    return tqdm(iterable, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True, **kwargs)


def tracker(name):
    """--report_to NAME, checked: accelerate silently drops a tracker whose package is missing."""
    if name and name not in [str(t) for t in get_available_trackers()]:
        raise UserError(f"--report_to {name}: the {name} package is not installed. pip install {name}")
    return name


# Started by `accelerate launch` (it sets ACCELERATE_MIXED_PRECISION) or torchrun: the launcher's end is
# the job's end. A plain `python train.py` (under nohup, say) outlives its shell as usual.
LAUNCHED = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
PARENT = os.getppid()


class Preemption:
    """SIGTERM and SIGUSR1 (what Slurm, Kubernetes and most schedulers send) only set a flag; the
    loop asks at each optimizer step, so the step in progress finishes and last/ is saved whole."""

    def __init__(self):
        self.signal = 0
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self.handler)
        if sys.platform == "linux" and LAUNCHED:
            # A scheduler or `kill` often signals only the top process, `accelerate launch`, which then
            # dies and leaves this process training on unseen: have the kernel send SIGTERM when it goes.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != PARENT:  # it was gone before we asked
                self.signal = signal.SIGTERM

    def handler(self, signum, frame):
        self.signal = signum

    def received(self, accelerator):
        """The signal number once any process got one (the same answer on every process), else 0."""
        if accelerator.num_processes == 1:
            return self.signal
        return int(accelerator.gather(torch.tensor([self.signal], device=accelerator.device)).max())


# ---------------------------------------------------------------- checkpoints
#
# A checkpoint directory holds what from_pretrained needs (config.json, model.safetensors, tokenizer
# files) plus what exact resume needs: optimizer.pt, lr.bin (scheduler), trainer_state.json
# (position, best loss, log) and one rng_state_<rank>.safetensors per process. Nothing in it is
# unpickled: tensors are loaded with weights_only=True, the rest is JSON.


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next (or the one in progress)
    steps_done_in_epoch: int = 0  # optimizer steps already taken in that epoch
    global_step: int = 0
    best_metric: float | None = None  # the best value of --metric_for_best so far (what best/ holds)
    bad_epochs: int = 0  # epochs since it last improved, for --early_stopping_patience
    num_processes: int = 1
    skipped_steps: int = 0  # --skip_nonfinite: steps skipped in the current epoch
    log: dict = field(default_factory=dict)  # what log.json holds


def checkpoint_dir(path):
    """The checkpoint at `path`, checked against its manifest (every file whole and unchanged)."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    if not path.exists() and (old / "manifest.json").is_file():
        try:
            os.replace(old, path)  # the process died between the two renames of publish()
        except FileNotFoundError:
            pass  # another process of this launch took it back first
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
    return path


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


def row_name(path, index):
    """How a message names the row at 0-based `index` of a data file: the line number an editor
    shows for line-based files (a CSV's header is line 1), else the row number counted from 1."""
    suffix = Path(str(path)).suffix
    if suffix in (".jsonl", ".txt"):
        return f"line {index + 1}"
    if suffix in (".csv", ".tsv"):
        return f"line {index + 2}"
    return f"row {index + 1}"


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


def rng_state(extra):
    """This process's RNG streams (and any per-process tensors in `extra`) as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state(), **extra}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(python_state, dtype=torch.int64)
    metadata = {"numpy": json.dumps([kind, pos, has_gauss, gauss]), "python": json.dumps([version, gauss_next])}
    return tensors, metadata


def set_rng_state(path):
    """Restores what rng_state() saved; returns the per-process tensors that are not RNG state."""
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
    return tensors


def fsync_tree(directory):
    for path in [*Path(directory).iterdir(), Path(directory)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fault_point():
    """Fault injection for the tests: TEMPLATE_CRASH_AT=k kills the process at the k-th point of a save."""
    global FAULT_POINTS
    FAULT_POINTS += 1
    if FAULT_POINTS == int(os.environ.get("TEMPLATE_CRASH_AT", 0)):
        os._exit(99)


FAULT_POINTS = 0


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(staging, target):
    """Replaces `target` by the complete directory `staging`. A crash at any moment leaves either
    `target` or `.old-<target>` whole; checkpoint_dir() takes the latter back."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
        fault_point()
    os.replace(staging, target)
    fsync_tree(target.parent)
    fault_point()
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, outdir, names, model, tokenizer, optimizer, scheduler, args, state, per_process):
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
            fault_point()
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            fault_point()
            torch.save(scheduler.state_dict(), staging / "lr.bin")
            write_json(staging / "my_config.json", vars(args))
            write_json(staging / "trainer_state.json", asdict(state))
            fault_point()
        tensors, metadata = rng_state(per_process)
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
        fault_point()
        for name in names[1:]:  # best/ shares last/'s files as hard links: nothing is written in place
            copy = outdir / f".staging-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(staging, copy, copy_function=os.link)
            publish(copy, outdir / name)
        publish(staging, outdir / names[0])
        write_json(outdir / "log.json", state.log)
        fault_point()
    accelerator.wait_for_everyone()


def load_weights(directory, model):
    """Loads a checkpoint's weights into the freshly built model, refusing one of another architecture."""
    try:
        load_model(model, Path(directory) / "model.safetensors", strict=True)
    except (RuntimeError, FileNotFoundError) as e:
        raise UserError(f"--resume {directory}: its weights do not fit the model that modeling.py builds "
                        f"({str(e).splitlines()[0][:300]}). Resume with the modeling.py and options it was "
                        f"trained with.") from None


def add_lora(model, args):
    """--lora_r: LoRA adapters (PEFT, through transformers' add_adapter) in the backbone, which is
    frozen; the rest of the model (the head) trains in full. On --resume the adapters are the checkpoint's."""
    try:
        import peft
    except ImportError:
        raise UserError("--lora_r needs the peft package: pip install peft") from None
    from transformers.integrations.peft import MIN_PEFT_VERSION
    if version.parse(peft.__version__) < version.parse(MIN_PEFT_VERSION):
        raise UserError(f"--lora_r: transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION}, "
                        f"installed {peft.__version__}. Install the tested versions: pip install -r requirements.txt "
                        f"-c constraints.txt")
    backbone = {id(p) for p in model.base_model.parameters()}
    if args.resume:
        model.load_adapter(str(args.resume), is_trainable=True)
    else:
        targets = (args.lora_target_modules.split(",") if args.lora_target_modules else
                   [f"{model.base_model_prefix}.{name}" for name, module in model.base_model.named_modules()
                    if isinstance(module, torch.nn.Linear)])
        try:
            model.add_adapter(peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                              lora_dropout=args.lora_dropout, target_modules=targets))
        except ValueError as e:
            raise UserError(f"--lora_target_modules {args.lora_target_modules}: {str(e).splitlines()[0][:300]}") from None
    for param in model.parameters():
        param.requires_grad = id(param) not in backbone  # the adapters and the head


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
    return set_rng_state(path) if path.is_file() else {}
