"""Helpers for train.py: options, data files, progress and signals, adapters. (Checkpoints and the
output folder are in checkpoint.py.)"""
import argparse
import codecs
import csv
import ctypes
import json
import math
import os
import signal
import sys
import weakref
from pathlib import Path
from typing import NamedTuple, Optional

import datasets
import datasets.table
import numpy
import pyarrow
import pyarrow.compute
import pyarrow.ipc
import torch
import transformers
import yaml
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType
from packaging import version
from tqdm.auto import tqdm


class UserError(SystemExit):
    """A mistake the user can fix: Python prints the message and exits with status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a misspelled option or a bad value as one line (not the whole usage) and no
    abbreviations (--lr_s would silently mean --lr_scheduler_type)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} ({self.prog} --help lists the options)")


# ---------------------------------------------------------------- options

# Options a resumed run does not take over from the checkpoint's my_config.json (--outdir: the
# checkpoint's own folder, wherever it has been copied, unless given).
NOT_RESUMED = {"resume", "config", "overwrite", "stop_after_steps", "ignore_mismatch", "outdir", "check"}
# Options that must equal the checkpoint's for the resumed run to be the run that was never stopped.
# Any other option given anew is allowed and printed as "changed on resume".
MUST_MATCH = ["model_name_or_path", "batch_size", "accumulation", "seed", "max_len", "lr", "weight_decay",
              "max_grad_norm", "lr_scheduler_type", "num_warmup_steps", "skip_nonfinite", "mixed_precision",
              "torch_compile", "group_by_length", "metric_for_best", "greater_is_better", "freeze_backbone",
              "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "dataset_config", "train_split"]


def number(kind, minimum, below=None):
    """An argparse type: a finite int or float >= minimum (and < below); the same check for values
    from a --config file or a checkpoint's my_config.json (see parse_options)."""
    def convert(text):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (below is not None and value >= below):
            bounds = f">= {minimum}" + (f" and < {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is not a {'whole ' if kind is int else ''}number {bounds}")
        return value
    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


def read_options_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such options file.")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
    except yaml.YAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if getattr(e, "problem_mark", None) else ""
        raise UserError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option names to values.")
    return values


def check_value(action, value, source):
    """A value from a file, held to what the option takes on the command line: its type, range and choices."""
    def refuse(expected):
        raise UserError(f"{source}: {action.dest}: {value!r} is not {expected}.")
    if value is None and action.default is None:
        return
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            refuse("true or false")
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        refuse("a " + (action.type.__name__ if action.type else "string"))
    elif action.type is not None:
        if isinstance(value, str) or (action.type.__name__ == "int" and not isinstance(value, int)):
            refuse(f"a number ({action.type.__name__})")
        try:
            action.type(str(value))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{source}: {action.dest}: {e}.") from None
    elif not isinstance(value, str):
        refuse("a string")
    if action.choices is not None and value not in action.choices:
        refuse(f"one of {', '.join(map(str, action.choices))}")


def parse_options(parser, argv=None):
    """Defaults < the resumed checkpoint's my_config.json < --config FILE < flags on the command line."""
    known, _ = parser.parse_known_args(argv)
    defaults, saved = {}, {}
    if known.resume:
        from checkpoint import find  # here: checkpoint.py imports this module
        folder = find(known.resume)  # or .old-<name>, where a crash between the two renames of a save left it
        if not (folder / "my_config.json").is_file():
            raise UserError(f"--resume {known.resume}: not a checkpoint of this template (no my_config.json). "
                            f"Give a checkpoint directory such as model/last.")
        saved = read_options_file(folder / "my_config.json")
        defaults.update({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    if known.config:
        defaults.update(read_options_file(known.config))
    actions = {action.dest: action for action in parser._actions}
    for key, value in defaults.items():
        source = known.config if key not in saved or saved[key] != value else f"{known.resume}/my_config.json"
        if key not in actions:
            parser.error(f"{source}: unknown option '{key}'")
        check_value(actions[key], value, source)
    if saved:
        defaults.setdefault("outdir", str(Path(known.resume).parent))  # the folder the checkpoint is in
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    changed = []
    for key, value in saved.items() if saved else []:
        if key in NOT_RESUMED or key not in actions or getattr(args, key) == value:
            continue
        if key in MUST_MATCH and not args.ignore_mismatch:
            raise UserError(f"--{key} {getattr(args, key)} differs from {known.resume}'s {value}, so the "
                            f"resumed run would not continue the same run. Drop the option, or add "
                            f"--ignore_mismatch to resume anyway (data order and results then differ).")
        changed.append(f"--{key} {value} -> {getattr(args, key)}")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"changed on resume: {', '.join(changed)}", file=sys.stderr)
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        raise UserError(f"--outdir {args.outdir} is a file; give a folder (it is created if missing).")
    return args


# ---------------------------------------------------------------- data

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


# Opening a cached file reads every record batch's header, and the kernel maps 64 KiB of the file
# around each one: with datasets' default of 1,000 rows a batch that is ~64 bytes of resident
# memory per row before a single row is read. Up to 100,000 rows a batch (JSON is read in 10 MB
# blocks: ~60,000 short rows) bring that near 1 byte. Local files only: their readers hand over
# whole blocks; a hub dataset keeps its builder's (one that yields images one by one would hold
# that many).
ROWS_PER_RECORD_BATCH = 100_000


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
            if suffix != ".parquet" and not is_utf8(path):  # pyarrow's JSON reader lets bad bytes through
                raise UserError(f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8.")
            options = {}
            if suffix in (".csv", ".tsv"):
                # Everything stays a string ("NA", "null" too), and TSV is split on tabs only:
                # GLUE-style files hold unbalanced quotes. A UTF-8 BOM is dropped by the reader.
                options = {"keep_default_na": False, "na_filter": False, "chunksize": ROWS_PER_RECORD_BATCH}
                if suffix == ".tsv":
                    options.update(delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = datasets.load_dataset(FILE_TYPES[suffix], data_files={split: path}, split=split,
                                         writer_batch_size=ROWS_PER_RECORD_BATCH, **options)
        elif Path(path).is_file():
            raise UserError(f"{path}: unknown file type '{suffix}'. Give a {', '.join(FILE_TYPES)} file.")
        else:
            rows = datasets.load_dataset(path, config_name, split=split)  # its builder's own batches (images...)
    except UnicodeDecodeError:
        raise UserError(f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8.") from None
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, UnicodeDecodeError):
            raise UserError(f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8.") from None
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


def is_utf8(path):
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def not_utf8_line(path):
    """`line N` of the first line of a file that is not UTF-8."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number}"
    return "somewhere"


def row_name(path, index):
    """How a message names the row at 0-based `index` of a data file: the line number an editor
    shows for line-based files (a CSV's header is line 1), else the row number counted from 1."""
    suffix = Path(str(path)).suffix
    if suffix in (".jsonl", ".txt"):
        return f"line {index + 1}"
    if suffix in (".csv", ".tsv"):
        return f"line {index + 2}"
    return f"row {index + 1}"


class CachedRows:
    """The rows of a datasets.Dataset as a torch Dataset reads them: rows[i], rows.__getitems__(indices)
    (a batch, what DataLoader asks for), len(rows), and rows.lengths(column) of a list column.

    Numbers and lists of numbers (token ids, labels: what a tokenizer makes) are read from the
    dataset's cache file with os.pread, not through datasets' memory map. Why: every page that a read
    through a map touches counts in the process's resident memory, and the kernel maps 64 KiB to
    2 MiB of the file around it (fault-around, large folios): the first two batches of 32 random rows
    of a 1M-row cache cost ~20 MiB, the lengths 4 bytes a row more, and the map itself ~64 KiB per
    record batch. What is kept instead is where each record batch's columns lie in the file. Other
    data (strings, booleans, nulls, a format or columns chosen, rows selected, renamed or added after
    caching, a dataset held in memory, no os.pread as on Windows) is read through datasets."""

    def __init__(self, dataset):
        self.size, self.fd, self.batches = len(dataset), None, None
        self.path = dataset.cache_files[0]["filename"] if len(dataset.cache_files) == 1 else None
        # The table must be the file as written: datasets records later changes (a rename, a column
        # selected) as replays on the table, and added rows or columns make another kind of table.
        if (hasattr(os, "pread") and self.path and isinstance(dataset.data, datasets.table.MemoryMappedTable)
                and all(change == "replace_schema_metadata" for change, *_ in dataset.data.replays)
                and dataset._indices is None and dataset.format["type"] is None
                and dataset.format["columns"] in (None, dataset.column_names)):
            self.identity = file_identity(os.stat(self.path))
            self.batches = record_batches(self.path, dataset.data.schema, len(dataset))
            self.starts = numpy.array([start for start, _ in self.batches or []])
        # Read by hand, datasets' table and its map are not needed: they go.
        self.dataset = dataset if self.batches is None else None

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        if self.batches is None:
            return self.dataset.__getitems__(indices)
        rows, fd = [], self.file()
        indices = [range(self.size)[i] for i in indices]  # IndexError outside; negative: from the end
        for i, batch in zip(indices, numpy.searchsorted(self.starts, indices, side="right") - 1):
            start, columns = self.batches[batch]
            rows.append({name: column.read(fd, i - start) for name, column in columns.items()})
        return rows

    def lengths(self, column):
        """The length of each row's list in `column` (int32), one read of its offsets per record batch."""
        if self.batches is None:
            lists = self.dataset.with_format("arrow")[column]  # in the dataset's order (a selection too)
            return pyarrow.compute.list_value_length(lists).cast(pyarrow.int32()).to_numpy()
        ends = [*self.starts[1:], self.size]
        return numpy.concatenate([numpy.diff(columns[column].offsets_of(self.file(), 0, end - start)).astype(numpy.int32)
                                  for (start, columns), end in zip(self.batches, ends)])

    def file(self):
        """The cache file, opened by the process that reads (a DataLoader worker started by spawn
        too): the same file whose layout was read, or a message if it was deleted or replaced."""
        if self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            if fd is None or file_identity(os.fstat(fd)) != self.identity:
                raise UserError(f"{self.path}: this cache file of the tokenized data was deleted or replaced "
                                f"while the run read it (another run cleaning the datasets cache?). Start again.")
            self.fd = fd
            weakref.finalize(self, os.close, fd)
        return self.fd

    def __getstate__(self):
        return {**self.__dict__, "fd": None}


def file_identity(stat):
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class Column(NamedTuple):
    """Where a column of one record batch lies in an Arrow IPC file: the file offset of its values,
    of `dtype`; for a list column, also that of its offsets (where each row's values start, one
    more than the rows, of `offsets_dtype`)."""
    values: int
    dtype: numpy.dtype
    offsets: Optional[int] = None
    offsets_dtype: Optional[numpy.dtype] = None

    def read(self, fd, row):
        if self.offsets is None:
            return read_array(fd, self.dtype, self.values, row, 1).tolist()[0]
        start, end = self.offsets_of(fd, row, 1).tolist()
        return read_array(fd, self.dtype, self.values, start, end - start).tolist()

    def offsets_of(self, fd, row, rows):
        if self.offsets is None:
            raise ValueError("lengths(): not a column of lists")
        return read_array(fd, self.offsets_dtype, self.offsets, row, rows + 1)


def read_array(fd, dtype, at, first, count):
    """Items first..first + count - 1 of an array of `dtype` that starts at offset `at` of a file."""
    data = os.pread(fd, count * dtype.itemsize, at + first * dtype.itemsize)
    if len(data) != count * dtype.itemsize:  # not silently fewer tokens
        raise EOFError("a cache file of the tokenized data was cut short while the run read it")
    return numpy.frombuffer(data, dtype)


def record_batches(path, schema, rows):
    """[(first row, {column name: Column})] of each record batch with rows of an Arrow IPC stream (how
    datasets caches), or None unless every column holds numbers or lists of numbers, without nulls.
    Reads the file's headers only, through a memory map that closes with it."""
    batches, start = [], 0
    with pyarrow.memory_map(path) as f:
        messages = pyarrow.ipc.MessageReader.open_stream(f)
        if not pyarrow.ipc.read_schema(messages.read_next_message()).equals(schema):
            return None
        while True:
            try:
                message = messages.read_next_message()
            except StopIteration:
                break
            batch = pyarrow.ipc.read_record_batch(message, schema)  # its buffers: slices of the body, unread
            if batch.num_rows:
                columns = {name: column_of(array, message.body, f.tell() - message.body.size)
                           for name, array in zip(schema.names, batch.columns)}
                if None in columns.values():
                    return None
                batches.append((start, columns))
                start += batch.num_rows
    return batches if start == rows else None


def column_of(array, body, at):
    """The Column of `array`, whose buffers lie in a message `body` at file offset `at`, or None."""
    def offset(buffer):
        if buffer.size == 0:  # nothing to read
            return at
        inside = body.address <= buffer.address and buffer.address + buffer.size <= body.address + body.size
        return at + buffer.address - body.address if inside else None  # not inside: a decompressed copy
    pa_type, offsets = array.type, [offset(b) if b is not None else None for b in array.buffers()]
    if array.null_count or array.offset:
        return None
    if is_number(pa_type) and offsets[1] is not None:
        return Column(offsets[1], numpy.dtype(pa_type.to_pandas_dtype()))
    if ((pyarrow.types.is_list(pa_type) or pyarrow.types.is_large_list(pa_type)) and is_number(pa_type.value_type)
            and not array.values.null_count and not array.values.offset and len(offsets) == 4
            and None not in (offsets[1], offsets[3])):
        return Column(offsets[3], numpy.dtype(pa_type.value_type.to_pandas_dtype()), offsets[1],
                      numpy.dtype(numpy.int32 if pyarrow.types.is_list(pa_type) else numpy.int64))
    return None


def is_number(pa_type):
    return pyarrow.types.is_integer(pa_type) or pyarrow.types.is_floating(pa_type)


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
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch),
                              dtype=torch.int32 if self.size < 2**31 else torch.int64)

    def __iter__(self):
        for chunk in self.order().split(1 << 12):
            yield from chunk.tolist()


class LengthGroupedSampler(ShuffledSampler):
    """--group_by_length: Trainer's order (the shuffled order cut into chunks of 50 batches, each
    sorted by length, longest first, and the longest example moved to the very front: the indices of
    transformers' get_length_grouped_indices), as a function of (seed, epoch) like ShuffledSampler,
    so that a resumed epoch replays the same batches. Written here because Trainer's makes Python
    lists of every index and length (~70 bytes an example); this one holds int32 tensors."""

    def __init__(self, batch_size, dataset, seed):
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise UserError("--group_by_length: the Dataset of dataset.py has no `lengths` (one length per sample).")
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = torch.tensor(lengths, dtype=torch.int32), batch_size  # a copy: arrow's are read-only

    def __iter__(self):
        chunk = max(min(self.size // (self.batch_size * 4), 50), 1) * self.batch_size
        chunks = [c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in self.order().split(chunk)]
        longest = int(torch.stack([self.lengths[c[0]] for c in chunks]).argmax())  # the first, on ties
        chunks[0][0], chunks[longest][0] = int(chunks[longest][0]), int(chunks[0][0])
        for c in chunks:
            yield from c.tolist()


# ---------------------------------------------------------------- display and signals

def progress(accelerator, iterable, desc, **kwargs):
    """A tqdm bar on the main process only: `[Epoch 0] [TRAIN]:  12%|█▏  | 520/4387 [..., loss=2.56, lr=7.8e-6]`."""
    return tqdm(iterable, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True, **kwargs)


def show_samples(accelerator, format_samples, model, tokenizer, batch, outputs, k, step, bar):
    """--sample_every: modeling.py's format_samples() on the main process, in eval mode, without gradients,
    with the RNG streams restored afterwards: showing samples (even with generate()) changes nothing."""
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model).eval()
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        samples = format_samples(unwrapped, tokenizer, batch, outputs, k)
    unwrapped.train()
    bar.write(f"--- samples at step {step}:\n" + "\n".join(samples[:k]))


def resume_command(accelerator, outdir):
    """The full command that continues this run, launch options included."""
    launch = "accelerate launch"
    if accelerator.num_processes > 1:
        launch = f"accelerate launch --multi_gpu --num_processes {accelerator.num_processes}"
        if accelerator.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)):
            launch += " --num_machines N --machine_rank R --main_process_ip IP (as before)"
        if accelerator.device.type == "cpu":
            launch = f"ACCELERATE_USE_CPU=1 {launch}"
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        launch = "accelerate launch --config_file (the one this run used)"
    return f"{launch} train.py --resume {outdir}/last"


def tracker(name):
    """--report_to NAME, checked: accelerate silently drops a tracker whose package is missing."""
    if name and name not in [str(t) for t in get_available_trackers()]:
        raise UserError(f"--report_to {name}: the {name} package is not installed. pip install {name}")
    return name


# Started by `accelerate launch` (it sets ACCELERATE_MIXED_PRECISION) or torchrun: the launcher's end is
# the job's end. A plain `python train.py` (under nohup, say) outlives its shell as usual.
LAUNCHED = "ACCELERATE_MIXED_PRECISION" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
PARENT = os.getppid()


class RunningLoss:
    """The training loss of the epoch in progress (this process's sum and batch count) and the number
    of skipped non-finite steps, kept on the device: reading them waits for the GPU, so they are read
    only when shown, every --log_every steps."""

    def __init__(self, device, saved=(0.0, 0)):
        self.sum = torch.tensor(saved[0], dtype=torch.float64, device=device)
        self.batches = torch.tensor(saved[1], dtype=torch.float64, device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.float64, device=device)
        self.shown = (float(saved[0]), float(saved[1]))  # the sums when last shown

    def add(self, loss):
        finite = torch.isfinite(loss)  # a non-finite loss is left out of the mean (and its step skipped)
        self.sum += torch.where(finite, loss, 0.0)
        self.batches += finite

    def since_shown(self):
        """(mean loss since the last call or None, non-finite steps since the last call): one read."""
        total, batches, nonfinite = torch.stack([self.sum, self.batches, self.nonfinite_steps]).tolist()
        (shown_total, shown_batches), self.shown = self.shown, (total, batches)
        self.nonfinite_steps.zero_()
        return ((total - shown_total) / (batches - shown_batches) if batches > shown_batches else None), int(nonfinite)

    def per_process(self, accelerator):
        """[[sum, batches] of each process], for the checkpoint (a collective: every process calls it)."""
        return accelerator.gather(torch.stack([self.sum, self.batches])[None]).tolist()

    def epoch_mean(self, accelerator):
        """The mean over every process's batches of the epoch; then starts the next epoch's sums."""
        totals = accelerator.reduce(torch.stack([self.sum, self.batches]), reduction="sum")
        mean = (totals[0] / totals[1]).item()
        self.sum.zero_()
        self.batches.zero_()
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
    return any(v.startswith(b"OMP_NUM_THREADS=") for v in environment) or b"--num_cpu_threads_per_process" in command


class Preemption:
    """SIGTERM and SIGUSR1 (what Slurm, Kubernetes and most schedulers send) and Ctrl-C only set a
    flag; the loop asks every --log_every steps, so the step in progress finishes and last/ is saved
    whole. A second Ctrl-C stops at once (a save in progress is abandoned: the previous checkpoint
    stays as it was)."""

    def __init__(self, outdir):
        self.signal, self.outdir = 0, outdir
        self.previous = {signum: signal.signal(signum, self.handler)
                         for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        if sys.platform == "linux" and LAUNCHED:
            # A scheduler or `kill` often signals only the top process, `accelerate launch`, which then
            # dies and leaves this process training on unseen: have the kernel send SIGTERM when it goes.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != PARENT:  # it was gone before we asked
                self.signal = signal.SIGTERM

    def handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise UserError(f"stopped at once by a second Ctrl-C; {self.outdir}/last is the last checkpoint that "
                            f"was saved whole (if any): --resume {self.outdir}/last")
        if signum == signal.SIGINT:
            os.write(2, b"\nCtrl-C: finishing this step and saving last/ (Ctrl-C again to stop at once)\n")
        self.signal = signum

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def received(self, accelerator):
        """The signal number once any process got one (the same answer on every process), else 0."""
        if accelerator.num_processes == 1:
            return self.signal
        return int(accelerator.gather(torch.tensor([self.signal], device=accelerator.device)).max())


# ---------------------------------------------------------------- adapters

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
