"""USER EDITS: the data. Example: sequence to sequence, one (source, target) pair per row.

Copy it over the repository's dataset.py, with modeling.py beside it:

    cp examples/seq2seq/{modeling,dataset}.py .

Reads a .jsonl, .json, .csv, .tsv or .parquet file (or a hub dataset, see --dataset_config) with a
"source" and a "target" column (change SOURCE and TARGET below if yours are named otherwise). Both
are tokenized (the tokenizer ends each with </s>) and truncated to --max_len tokens. There are no
classes, so `Dataset.labels` is None. predict.py needs no target column; if there is one, its
predictions say whether each generated text is exactly the target.

What train.py expects of this file (as for the default task):
  * `load_tokenizer(source, args)`: the tokenizer that generate_dataset() receives.
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` returns a torch
    Dataset.
  * `Dataset.collate(samples)` pads a batch: input_ids and attention_mask (the source), labels (the
    target's token ids, -100 on padding; T5 makes its decoder input from them, shifted right).
  * `Dataset.lengths`: the source plus target tokens of each pair, for --group_by_length.
"""

from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from utils import RowsDataset, UserError, load_rows, row_name

SOURCE, TARGET = "source", "target"


class Dataset(RowsDataset):
    """Rows of input_ids (the source) and labels (the target's); RowsDataset reads them (len, [i],
    __getitems__, lengths)."""

    LENGTH_COLUMNS = ("input_ids", "labels")  # `lengths`: source plus target tokens of each pair

    def __init__(self, rows, tokenizer):
        super().__init__(rows)
        self.labels = None  # no classes
        self.tokenizer = tokenizer  # build_model() checks the model's vocabulary against it
        # Pads input_ids and attention_mask with the pad token, labels with -100 (no loss there).
        self.pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def collate(self, samples):
        batch = self.pad(samples)
        # rows without a target (predict.py): no labels key, not None
        if batch.get("labels") is None:
            batch.pop("labels", None)
        return batch


def load_tokenizer(source, args):
    """The tokenizer of --model_name_or_path (or of the checkpoint, on --resume and in
    predict.py)."""
    # trust_remote_code=False: never run a folder's own code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    rows = load_rows(path, split, args.dataset_config)
    # predict.py: the target is optional
    with_target = not predicting or TARGET in rows.column_names
    for column in (SOURCE, TARGET) if with_target else (SOURCE,):
        if column not in rows.column_names:
            raise UserError(
                f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change SOURCE / TARGET in dataset.py."
            )
    # a batch of sources of different lengths could not be padded
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"the tokenizer of {args.model_name_or_path} has no pad token, which this example pads "
            f"the sources with: give it one (tokenizer.pad_token = ...) in load_tokenizer()."
        )
    max_len = args.max_len  # not args itself: the cache key would then change with every option

    def texts(batch, column, indices):
        """The column's texts. A number counts as the text it reads as: a CSV column of digits (or a
        JSON column that mixes numbers and strings) reaches us as numbers."""
        values = [
            str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for v in batch[column]
        ]
        for i, text in zip(indices, values):
            if not isinstance(text, str) or not text.strip():
                what = (
                    "missing"
                    if text is None
                    else "empty"
                    if isinstance(text, str)
                    else f"{text!r}, not a text"
                )
                raise UserError(
                    f"{path}, {row_name(path, i)}: the '{column}' field is {what}. Each row needs "
                    f"a non-empty '{SOURCE}' and '{TARGET}' text."
                )
        return values

    def encode(batch, indices):
        # Token ids only: the attention mask is made per batch by collate(). The targets become
        # `labels`, tokenized as targets (text_target=: a tokenizer may treat them differently).
        encoded = tokenizer(
            texts(batch, SOURCE, indices),
            truncation=True,
            max_length=max_len,
            text_target=texts(batch, TARGET, indices) if with_target else None,
            return_attention_mask=False,
        )
        return {key: encoded[key] for key in ("input_ids", "labels") if key in encoded}

    # Cached by the datasets library: a second run with the same file, tokenizer and max_len reads
    # the tokens back instead of tokenizing again.
    rows = rows.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Tokenizing {path}",
    )
    return Dataset(rows, tokenizer)
