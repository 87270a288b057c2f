"""USER EDITS: the data. The default reads text classification files: JSONL, CSV or TSV with a
"text" and a "label" column (change TEXT and LABEL below if yours are named otherwise).

What train.py expects of this file:
  * `generate_dataset(path, tokenizer, max_len, train_set=None)` returns a torch Dataset
    (__len__, __getitem__). train.py calls it once for --train_file and once for --valid_file,
    passing the training set the second time so that both share what the training data decides
    (here: the label names and their ids).
  * `Dataset.collate(samples)` turns a list of samples into a batch: a dict whose keys are the
    arguments of Model.forward(). Padding happens here, per batch, not to a fixed length.
  * Bad data raises UserError with the file and line, so the user sees one clear message.
"""
import csv
import json
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

from utils import UserError

TEXT, LABEL = "text", "label"


class Dataset(torch.utils.data.Dataset):
    def __init__(self, encodings, labels, label_names, tokenizer):
        self.encodings = encodings  # {"input_ids": [[...], ...], "attention_mask": ...}
        self.label_ids = labels
        self.labels = label_names  # index = class id; build_model() puts them in the model config
        self.collate = DataCollatorWithPadding(tokenizer)

    def __len__(self):
        return len(self.label_ids)

    def __getitem__(self, i):
        return {**{key: values[i] for key, values in self.encodings.items()}, "labels": self.label_ids[i]}


def read_rows(path):
    """Yields (line number, row dict) from a .jsonl, .csv or .tsv file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file. Check --train_file / --valid_file.")
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not a JSON object ({e.msg}). Each line must be one "
                                    f'object like {{"{TEXT}": "...", "{LABEL}": "..."}}.') from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
                yield number, row
    elif path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            # TSV is split on tabs only: GLUE-style files contain unbalanced quotes.
            reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv"
                      else csv.DictReader(f))
            for row in reader:
                if None in row or None in row.values():
                    raise UserError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} columns "
                                    f"({', '.join(reader.fieldnames)}), got a different number.")
                yield reader.line_num, row
    else:
        raise UserError(f"{path}: unknown file type '{path.suffix}'. Use .jsonl, .csv or .tsv.")


def generate_dataset(path, tokenizer, max_len, train_set=None):
    texts, labels = [], []
    for number, row in read_rows(path):
        for column in (TEXT, LABEL):
            if column not in row:
                raise UserError(f"{path}:{number}: no '{column}' field (found: {', '.join(row)}).")
        if not isinstance(row[TEXT], str) or not row[TEXT].strip():
            raise UserError(f"{path}:{number}: the '{TEXT}' field is empty or not a string.")
        texts.append(row[TEXT])
        labels.append((number, str(row[LABEL])))
    if not texts:
        raise UserError(f"{path}: the file holds no examples.")

    label_names = train_set.labels if train_set is not None else sorted({label for _, label in labels})
    label_ids = {name: i for i, name in enumerate(label_names)}
    for number, label in labels:
        if label not in label_ids:
            raise UserError(f"{path}:{number}: label '{label}' is not among the training labels "
                            f"({', '.join(label_names)}).")
    encodings = tokenizer(texts, truncation=True, max_length=max_len)
    return Dataset(dict(encodings), [label_ids[label] for _, label in labels], label_names, tokenizer)

