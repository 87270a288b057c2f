"""USER EDITS: the data. The default reads text classification data: a .jsonl, .json, .csv, .tsv
or .parquet file (or a hub dataset, see --dataset_config) with a "text" and a "label" column;
change TEXT and LABEL below if yours are named otherwise.

What train.py and predict.py read from this file (nothing else):
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` (required)
    returns a torch Dataset (__len__, __getitem__). train.py calls it for --train_file (split
    "train") and for --valid_file (split "validation"), passing the training set's `labels` the
    second time so that both share what the training data decides (here: the label names and their
    ids). `args` holds every option of train.py (args.max_len, ...). predict.py calls it with
    predicting=True: the label column may then be absent. A row may give several examples (the
    windows of a long text: see examples/question_answering); for predict.py to write one line per
    input row, each example then carries its row's number as "row" in the batch (a list of ints),
    and modeling.merge_predictions() merges the row's predictions.
  * `load_tokenizer(source, args)` (optional): the tokenizer (or any processor) that
    generate_dataset() receives, for `source` = --model_name_or_path, or the checkpoint on --resume
    and in predict.py; it is saved into every checkpoint. Without it there is none (a tabular or
    image task, say).
  * On the Dataset, all optional: `collate(samples)` turns a list of samples into a batch, a dict
    whose keys are the arguments of Model.forward() (padding per batch, not to a fixed length;
    default: torch's default_collate). Values that are not tensors (gold strings, offsets, row
    numbers: lists, one item per example) may ride along for the hooks: they stay on the host as
    they are, and forward() gets one only if it names that parameter (not through **kwargs).
    `labels` is handed to the validation set (and to build_model() with the training set);
    `lengths` (one per sample) serves --group_by_length.
  * Bad data raises UserError naming the file and line, so the user sees one clear message.

Rows are read and tokenized with the `datasets` library: the result is cached (a second run with
the same file, tokenizer and max_len does not tokenize again). The Dataset subclasses
utils.RowsDataset, which reads its rows from the cache file, memory-mapped (datasets' own
Dataset.__getitems__), and counts `lengths` from the input_ids column; it adds only its labels,
tokenizer and collate.
"""

import math
from pathlib import Path

import datasets
import pyarrow
from transformers import AutoTokenizer, DataCollatorWithPadding

from utils import RowsDataset, UserError, learn_vocabulary, load_rows, row_name

TEXT, LABEL = "text", "label"
VOCABULARY_SIZE = 8000  # at most, for a vocabulary learnt from the training file (from scratch)


def load_tokenizer(source, args):
    """The tokenizer of a pretrained model or a checkpoint; for a model folder that holds a config
    and no tokenizer (training from scratch, like assets/tiny-bert), a WordPiece vocabulary learnt
    from --train_file (utils.learn_vocabulary), so that the user's own words are not [UNK]."""
    folder = Path(source)
    if folder.is_dir() and not any(
        (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        rows = load_rows(args.train_file, args.train_split, args.dataset_config)
        if TEXT not in rows.column_names:
            raise UserError(
                f"{args.train_file}: no '{TEXT}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change TEXT in dataset.py."
            )
        return learn_vocabulary(rows, TEXT, VOCABULARY_SIZE, args.max_len)
    # trust_remote_code=False: a folder that asks to run its own tokenizer code is refused, never
    # run.
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


class Dataset(RowsDataset):
    """Rows of input_ids and labels (class ids); RowsDataset reads them (len, [i], __getitems__,
    lengths)."""

    def __init__(self, rows, labels, tokenizer):
        super().__init__(rows)
        self.labels = labels  # index = class id; build_model() puts them in the model config
        # build_model() sizes a model trained from scratch by its vocabulary
        self.tokenizer = tokenizer
        self.collate = DataCollatorWithPadding(tokenizer)


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    rows = load_rows(path, split, args.dataset_config)
    need_labels = not predicting or LABEL in rows.column_names
    for column in (TEXT, LABEL) if need_labels else (TEXT,):
        if column not in rows.column_names:
            raise UserError(
                f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change TEXT / LABEL in dataset.py."
            )
    feature = rows.features.get(LABEL)
    # hub data: ids with names
    name_of = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
    # the training data decides the classes: its label names, sorted
    if need_labels and labels is None:
        try:
            labels = sorted(
                {name_of(label) for label in rows.unique(LABEL) if label not in (None, "")}
            )
        except pyarrow.ArrowNotImplementedError:
            # the reader found numbers and strings in one column
            raise UserError(
                f"{path}: the '{LABEL}' column mixes numbers and strings (e.g. 1 and \"1\"): write "
                f"every label the same way."
            ) from None
    label_ids = {name: i for i, name in enumerate(labels or [])}
    max_len = args.max_len  # not args itself: the cache key would then change with every option

    def encode(batch, indices):
        for i, text in zip(indices, batch[TEXT]):
            if not isinstance(text, str) or not text.strip():
                raise UserError(
                    f"{path}, {row_name(path, i)}: the '{TEXT}' field is empty or not a string."
                )
        # Token ids only: the attention mask (all ones before padding) is made per batch by
        # collate(), and token type ids (all zeros for one text) are the model's default. A third of
        # the cache to read. For text pairs, tokenizer(a, b, ...), drop return_token_type_ids=False.
        encoded = tokenizer(
            batch[TEXT],
            truncation=True,
            max_length=max_len,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        if need_labels:
            names = [None if label in (None, "") else name_of(label) for label in batch[LABEL]]
            for i, label, name in zip(indices, batch[LABEL], names):
                if isinstance(label, float) and not math.isfinite(label):
                    raise UserError(
                        f"{path}, {row_name(path, i)}: the '{LABEL}' field is {label}, not a class."
                    )
                if name is None:
                    raise UserError(
                        f"{path}, {row_name(path, i)}: the '{LABEL}' field is missing or empty."
                    )
                if name not in label_ids:
                    raise UserError(
                        f"{path}, {row_name(path, i)}: label '{name}' is not among the training "
                        f"labels ({', '.join(labels)})."
                    )
            encoded["labels"] = [label_ids[name] for name in names]
        return encoded

    # The cache key is the data's fingerprint plus a hash of encode() with everything it uses
    # (tokenizer, max_len, label ids): change any of them and the data is tokenized again.
    rows = rows.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Tokenizing {path}",
    )
    return Dataset(rows, labels, tokenizer)
