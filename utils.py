"""Helpers the user files import (dataset.py, modeling.py, the examples): UserError, data files read
into a datasets.Dataset with line-numbered messages, and a vocabulary learnt from the training text.
It imports nothing of the project; train.py's own machinery is in core/."""
import codecs
import csv
import json
import os
import weakref
from pathlib import Path
from typing import NamedTuple, Optional

import datasets
import datasets.table
import numpy
import pyarrow
import pyarrow.compute
import pyarrow.ipc
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


class UserError(SystemExit):
    """A mistake the user can fix: Python prints the message and exits with status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


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


# ---------------------------------------------------------------- a vocabulary of the user's own words

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def learn_vocabulary(rows, column, size=8000, max_len=None):
    """A BERT-style lower-cased WordPiece tokenizer learnt from the texts of `column` of `rows` (a
    datasets.Dataset): every character (alone and as a ##continuation), then the most frequent words
    up to `size` tokens, cached in HF_DATASETS_CACHE/vocabularies by the data's fingerprint (a second
    run on the same file reads it back). Built from word counts, ties broken by the word, so every
    machine learns the same vocabulary; tokenizers' WordPieceTrainer breaks ties in hash order, so two
    fresh machines got different token ids and, from the same seed, different results."""
    # Keyed by the data and by this function with what it uses: edit either and it is learnt again.
    name = f"{rows._fingerprint}-{Hasher.hash((learn_vocabulary, column, size, SPECIAL_TOKENS))}.json"
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "vocabularies" / name
    if not cache.is_file():
        counter = Tokenizer(models.WordLevel(unk_token="[UNK]"))  # counts words: most frequent first, then by word
        counter.normalizer = normalizers.BertNormalizer(lowercase=True)
        counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        texts = ([t for t in batch[column] if isinstance(t, str)] for batch in rows.iter(batch_size=10_000))
        counter.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2**31 - 1, special_tokens=[]))
        counts = counter.get_vocab()
        words = sorted(counts, key=counts.__getitem__)
        # Every character, and as a continuation every one that follows another in a word (CJK characters
        # are words of their own), so that nothing seen is [UNK]; then whole words while `size` allows.
        alphabet = SPECIAL_TOKENS + sorted({c for word in words for c in word}) + sorted(
            {f"##{c}" for word in words for c in word[1:]})
        tokens = alphabet + [word for word in words if len(word) > 1][:max(size - len(alphabet), 0)]
        tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tokenizer.normalizer, tokenizer.pre_tokenizer = counter.normalizer, counter.pre_tokenizer
        tokenizer.decoder = decoders.WordPiece()
        cls, sep = (tokenizer.token_to_id(token) for token in ("[CLS]", "[SEP]"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.{os.getpid()}")
        tokenizer.save(str(temporary))
        os.replace(temporary, cache)  # whole or absent, whichever process gets there first
    options = {} if max_len is None else {"model_max_length": max_len}
    return PreTrainedTokenizerFast(tokenizer_file=str(cache), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", **options)
