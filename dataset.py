"""USER EDITS: the data. The default reads text classification data: a .jsonl, .json, .csv, .tsv
or .parquet file (or a hub dataset, see --dataset_config) with a "text" and a "label" column;
change TEXT and LABEL below if yours are named otherwise.

What train.py expects of this file:
  * `generate_dataset(path, split, tokenizer, args, labels=None)` returns a torch Dataset
    (__len__, __getitem__). train.py calls it for --train_file (split "train") and for
    --valid_file (split "validation"), passing the training set's `labels` the second time so that
    both share what the training data decides (here: the label names and their ids). `args` holds
    every option of train.py (args.max_len, ...). predict.py calls it with `need_labels=False`.
  * `Dataset.collate(samples)` turns a list of samples into a batch: a dict whose keys are the
    arguments of Model.forward(). Padding happens here, per batch, not to a fixed length.
  * `Dataset.lengths` (optional): the length of each sample, for --group_by_length.
  * Bad data raises UserError naming the file and row, so the user sees one clear message.

Rows are read and tokenized with the `datasets` library: the result is cached (a second run with
the same file, tokenizer and max_len does not tokenize again) and memory-mapped, so memory does not
grow with the size of the data.
"""
import datasets
import pyarrow.compute
import torch
from transformers import DataCollatorWithPadding

from utils import UserError, load_rows

TEXT, LABEL = "text", "label"


class Dataset(torch.utils.data.Dataset):
    def __init__(self, rows, labels, tokenizer):
        self.rows = rows  # a datasets.Dataset with input_ids, attention_mask, ... and labels (class ids)
        self.labels = labels  # index = class id; build_model() puts them in the model config
        self.collate = DataCollatorWithPadding(tokenizer)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __getitems__(self, indices):  # what DataLoader calls: one read for the whole batch
        return self.rows.__getitems__(indices)

    @property
    def lengths(self):
        return pyarrow.compute.list_value_length(self.rows.data.column("input_ids")).to_numpy()


def generate_dataset(path, split, tokenizer, args, labels=None, need_labels=True):
    rows = load_rows(path, split, args.dataset_config)
    need_labels = need_labels or LABEL in rows.column_names
    for column in (TEXT, LABEL) if need_labels else (TEXT,):
        if column not in rows.column_names:
            raise UserError(f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                            f"Rename it, or change TEXT / LABEL in dataset.py.")
    feature = rows.features.get(LABEL)
    name_of = feature.int2str if isinstance(feature, datasets.ClassLabel) else str  # hub data: ids with names
    if need_labels and labels is None:  # the training data decides the classes: its label names, sorted
        labels = sorted({name_of(label) for label in rows.unique(LABEL) if label not in (None, "")})
    label_ids = {name: i for i, name in enumerate(labels or [])}
    max_len = args.max_len  # not args itself: the cache key would then change with every option

    def encode(batch, indices):
        for i, text in zip(indices, batch[TEXT]):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{path}: row {i + 1}: the '{TEXT}' field is empty or not a string.")
        encoded = tokenizer(batch[TEXT], truncation=True, max_length=max_len)
        if need_labels:
            names = [None if label in (None, "") else name_of(label) for label in batch[LABEL]]
            for i, name in zip(indices, names):
                if name is None:
                    raise UserError(f"{path}: row {i + 1}: the '{LABEL}' field is missing or empty.")
                if name not in label_ids:
                    raise UserError(f"{path}: row {i + 1}: label '{name}' is not among the training labels "
                                    f"({', '.join(labels)}).")
            encoded["labels"] = [label_ids[name] for name in names]
        return encoded

    # The cache key is the data's fingerprint plus a hash of encode() with everything it uses
    # (tokenizer, max_len, label ids): change any of them and the data is tokenized again.
    rows = rows.map(encode, batched=True, with_indices=True, remove_columns=rows.column_names,
                    desc=f"Tokenizing {path}")
    return Dataset(rows, labels, tokenizer)
