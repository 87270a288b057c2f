"""Helpers the user files import (dataset.py, modeling.py, the examples): UserError, data files read
into a datasets.Dataset with line-numbered messages, RowsDataset (the torch Dataset over those rows
that every task's Dataset builds on), and a vocabulary learnt from the training text; also
datasets_cache_space(), the one line train.py gives for a full disk under the datasets cache. It
imports nothing of the project; train.py's own machinery is in core/."""

import codecs
import contextlib
import csv
import errno
import functools
import hashlib
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import datasets
import pyarrow.compute
import torch
from datasets.fingerprint import Hasher
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import GenerationConfig, PreTrainedTokenizerFast


class UserError(SystemExit):
    """A mistake the user can fix: Python prints the message and exits with status 1, no
    traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------- data

FILE_TYPES = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


# Opening a cached file reads every record batch's header, and the kernel maps 64 KiB of the file
# around each one: with datasets' default of 1,000 rows a batch that is ~64 bytes of resident memory
# per row before a single row is read. Up to 100,000 rows a batch (JSON: a block of
# JSON_BYTES_PER_READ, ~6,000 short rows) bring that near 1 byte. Local files only: their readers
# hand over whole blocks; a hub dataset keeps its builder's (one that yields images one by one would
# hold that many).
ROWS_PER_RECORD_BATCH = 100_000
# JSON lines are read 1 MiB at a time (datasets' default: 10 MB), ~6,000 short rows a record batch:
# pyarrow parses each block on its threads, and its allocator and Python's kept ~100 MB of what a
# 1M-row file's 10 MB blocks had used (~100 bytes a row, on the first run only); 1 MiB blocks
# ~20 MB.
JSON_BYTES_PER_READ = 1 << 20


def has_weights(model_name_or_path):
    """Whether --model_name_or_path gives pretrained weights: a hub id, or a folder with weight
    files. A folder with a config only (assets/tiny-bert) is a model to train from scratch."""
    local = Path(model_name_or_path)
    return not local.is_dir() or any(local.glob("*.safetensors")) or any(local.glob("*.bin"))


def load_rows(path, split="train", config_name=None):
    """A data file (.jsonl .json .csv .tsv .parquet .txt) or a hub dataset name as a
    datasets.Dataset: memory-mapped from the datasets cache (HF_DATASETS_CACHE), so a second run
    reads it back."""
    path = str(path)
    suffix = Path(path).suffix
    try:
        if suffix in FILE_TYPES:
            if not Path(path).is_file():
                what = file_kind(path)
                raise UserError(
                    f"{path}: {f'a {what}, not a file of data' if what else 'no such data file'}. "
                    f"Check --train_file / --valid_file."
                )
            if Path(path).stat().st_size == 0:
                raise UserError(f"{path}: the file holds no examples.")
            # pyarrow's JSON reader lets bad bytes through
            if suffix != ".parquet" and not is_utf8(path):
                raise UserError(
                    f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8."
                )
            options = {"chunksize": JSON_BYTES_PER_READ} if FILE_TYPES[suffix] == "json" else {}
            if suffix in (".csv", ".tsv"):
                # Everything stays a string ("NA", "null" too), and TSV is split on tabs only:
                # GLUE-style files hold unbalanced quotes. A UTF-8 BOM is dropped by the reader.
                options = {
                    "keep_default_na": False,
                    "na_filter": False,
                    "chunksize": ROWS_PER_RECORD_BATCH,
                }
                if suffix == ".tsv":
                    options.update(delimiter="\t", quoting=csv.QUOTE_NONE)
            # datasets keys its cache of a local file, and the rows' fingerprint (which keys the
            # tokenized cache and the learnt vocabulary), by path and mtime: a file rewritten with
            # the same size and its old mtime (rsync -t, a restore) would give the old rows. Keyed
            # by the file's bytes as well, a changed file is always read again.
            digest = data_sha256(path)
            cache = Path(datasets.config.HF_DATASETS_CACHE) / "by-content" / digest[:16]
            rows = datasets.load_dataset(
                FILE_TYPES[suffix],
                data_files={split: path},
                split=split,
                cache_dir=str(cache),
                writer_batch_size=ROWS_PER_RECORD_BATCH,
                **options,
            )
            fingerprint = Hasher.hash((rows._fingerprint, digest))
            # a view: no copy
            rows = rows.select_columns(rows.column_names, new_fingerprint=fingerprint)
        elif Path(path).is_file():
            raise UserError(
                f"{path}: unknown file type '{suffix}'. Give a {', '.join(FILE_TYPES)} file."
            )
        else:
            # its builder's own batches (images...)
            rows = datasets.load_dataset(path, config_name, split=split)
    except UnicodeDecodeError:
        raise UserError(
            f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8."
        ) from None
    except datasets.exceptions.DatasetGenerationError as e:
        if disk_full(e):  # the cache's disk, not the file: train.py says so
            raise
        if isinstance(e.__cause__, UnicodeDecodeError):
            raise UserError(
                f"{path}, {not_utf8_line(path)}: not UTF-8 text. Save the file as UTF-8."
            ) from None
        bad = bad_line(path)
        raise UserError(f"{path}, {bad}" if bad else f"{path}: {e.__cause__ or e}") from None
    except (
        OSError,
        ValueError,
        datasets.exceptions.DatasetNotFoundError,
    ) as e:  # OSError: hub unreachable too
        if disk_full(e):
            raise
        if suffix in FILE_TYPES and "corresponds to no data" in str(e):
            raise UserError(f"{path}: the file holds no examples.") from None
        raise UserError(
            f"{path}: could not load it as a file ({', '.join(FILE_TYPES)}) or a dataset "
            f"(split '{split}', config {config_name}): {str(e).splitlines()[0][:300]}"
        ) from None
    if len(rows) == 0:
        raise UserError(f"{path}: the file holds no examples.")
    return rows


@contextlib.contextmanager
def datasets_cache_space():
    """While the data is read, tokenized or its vocabulary learnt: a full disk under the datasets
    cache is one line naming the folder, and a stop (SIGTERM, SIGUSR1, Ctrl-C) exits with the
    signal's status; either way the temporary files datasets left there (tmpXXXX, from a map cut
    short, written since this run began) are removed, and the next run starts them afresh."""
    cache, start = Path(datasets.config.HF_DATASETS_CACHE), time.time() - 1

    def stop(signum, frame):  # the default action would kill the process before any cleanup
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    stops = (signal.SIGTERM, signal.SIGUSR1)
    previous = {signum: signal.signal(signum, stop) for signum in stops} if main else {}
    try:
        yield
    except BaseException as e:
        for path in cache.rglob("tmp*"):  # written since this run started, never finished
            if path.is_file() and path.stat().st_mtime >= start:
                path.unlink(missing_ok=True)
        if not disk_full(e):
            raise
        raise UserError(
            f"no space left on the device of the datasets cache {cache} while reading or "
            f"tokenizing the data. Free space there, or set HF_DATASETS_CACHE to a folder "
            f"with room, and run again."
        ) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def disk_full(error):
    """Whether `error`, or one it came from, is a full disk (ENOSPC: OSError, or the text of
    tokenizers' and pyarrow's own errors); datasets' map follows it with "I/O operation on closed
    file"."""
    while error is not None:
        if (
            isinstance(error, OSError) and error.errno == errno.ENOSPC
        ) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def file_kind(path):
    """What is at `path` when it is not a regular file: "folder", "FIFO", ... or None (nothing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = [
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "special file")


def sha256(path):
    """The sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_sha256(path):
    """sha256() of a data file, computed once per version of the file in a process (the cache key
    and the checkpoint's record both need it): by its inode, size, mtime and ctime (a write changes
    ctime, which no tool sets back)."""
    info = os.stat(path)
    key = (
        os.path.abspath(path),
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
    )
    if key not in DIGESTS:
        DIGESTS[key] = sha256(path)
    return DIGESTS[key]


DIGESTS = {}


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
                return (
                    f"line {number}: not a JSON object ({e}). Each line must be one object like "
                    '{"text": "..."}.'
                )
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


def generate(model, inputs, **settings):
    """model.generate(**inputs) with exactly `settings` and transformers' defaults for every other
    setting, never those of the generation_config.json of a model folder or checkpoint: its
    num_beams, num_return_sequences, min_new_tokens, repetition_penalty, no_repeat_ngram_size ...
    would silently change a metric that assumes greedy decoding, or give several rows a prompt.
    Done by swapping the model's generation_config, as transformers fills every value a
    GenerationConfig passed to generate() leaves unset from the model's own."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(**settings)
    try:
        return model.generate(**inputs)
    finally:
        model.generation_config = saved


class RowsDataset(torch.utils.data.Dataset):
    """A torch Dataset over `rows`, a datasets.Dataset read from its cache file (memory-mapped):
    len(), [i], __getitems__ (DataLoader's one call per batch: datasets' own), and `lengths` (for
    --group_by_length): the tokens of each row, int32 numpy, counted by arrow without reading a row,
    summed over the list columns LENGTH_COLUMNS. A task's Dataset subclasses it and adds what is its
    own (labels, tokenizer, collate)."""

    LENGTH_COLUMNS = ("input_ids",)  # the list columns whose lengths `lengths` adds up, per row

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __getitems__(self, indices):  # what DataLoader calls: one call for the whole batch
        return self.rows.__getitems__(indices)

    @property
    def lengths(self):
        table = self.rows.with_format("arrow")
        counts = [pyarrow.compute.list_value_length(table[c]) for c in self.LENGTH_COLUMNS]
        return functools.reduce(pyarrow.compute.add, counts).to_numpy()


# ---------------------------------------------------- a vocabulary of the user's own words

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def learn_vocabulary(rows, column, size=8000, max_len=None):
    """A BERT-style lower-cased WordPiece tokenizer learnt from the texts of `column` of `rows` (a
    datasets.Dataset): every character (alone and as a ##continuation), then the most frequent words
    up to `size` tokens, cached in HF_DATASETS_CACHE/vocabularies by the data's fingerprint (a
    second run on the same file reads it back). Built from word counts, ties broken by the word, so
    every machine learns the same vocabulary; tokenizers' WordPieceTrainer breaks ties in hash
    order, so two fresh machines got different token ids and, from the same seed, different
    results."""
    # Keyed by the data and by this function with what it uses: edit either and it is learnt again.
    name = (
        f"{rows._fingerprint}-{Hasher.hash((learn_vocabulary, column, size, SPECIAL_TOKENS))}.json"
    )
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "vocabularies" / name
    if not cache.is_file():
        # counts words: most frequent first, then by word
        counter = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        counter.normalizer = normalizers.BertNormalizer(lowercase=True)
        counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        texts = (
            [t for t in batch[column] if isinstance(t, str)]
            for batch in rows.iter(batch_size=10_000)
        )
        counter.train_from_iterator(
            texts, trainers.WordLevelTrainer(vocab_size=2**31 - 1, special_tokens=[])
        )
        counts = counter.get_vocab()
        words = sorted(counts, key=counts.__getitem__)
        # Every character, and as a continuation every one that follows another in a word (CJK
        # characters are words of their own), so that nothing seen is [UNK]; then whole words while
        # `size` allows.
        alphabet = (
            SPECIAL_TOKENS
            + sorted({c for word in words for c in word})
            + sorted({f"##{c}" for word in words for c in word[1:]})
        )
        tokens = (
            alphabet + [word for word in words if len(word) > 1][: max(size - len(alphabet), 0)]
        )
        tokenizer = Tokenizer(
            models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]")
        )
        tokenizer.normalizer, tokenizer.pre_tokenizer = counter.normalizer, counter.pre_tokenizer
        tokenizer.decoder = decoders.WordPiece()
        cls, sep = (tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.{os.getpid()}")
        try:
            tokenizer.save(str(temporary))
            os.replace(temporary, cache)  # whole or absent, whichever process gets there first
        except BaseException:  # a full disk, say: no partial file stays behind
            temporary.unlink(missing_ok=True)
            raise
    options = {} if max_len is None else {"model_max_length": max_len}
    return PreTrainedTokenizerFast(
        tokenizer_file=str(cache),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **options,
    )
