"""USER EDITS: the data. Example: causal language modelling, one text per line or row.

Copy it over the repository's dataset.py, with modeling.py beside it:

    cp examples/causal_lm/{modeling,dataset}.py .

Reads a .txt file (one text per line; blank lines are skipped in training, kept by predict.py) or
a .jsonl, .json, .csv, .tsv or .parquet file (or a hub dataset, see --dataset_config) with a "text"
column. Each text becomes its tokens plus the end-of-text token (the model learns where a text
ends). With PACK (below), as Hugging Face's run_clm.py does, the texts of each 1,000 rows are then
concatenated and cut into blocks of --max_len tokens, for training and validation: nothing
truncated or dropped, no padding but in the batch of each 1,000 rows' last, shorter block, and
attention across the texts of a block. Without it each text is truncated to --max_len and batches
are padded. predict.py always gets one example per row. There are no classes, so `Dataset.labels` is
None.

What train.py expects of this file (as for the default task):
  * `load_tokenizer(source, args)`: the tokenizer that generate_dataset() receives.
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` returns a torch
    Dataset.
  * `Dataset.collate(samples)` pads a batch: input_ids, attention_mask, and labels (the input ids,
    -100 on padding; the model shifts them by one position itself).
  * `Dataset.lengths`: the length of each sample, for --group_by_length.
"""

import torch  # noqa: F401 (unused here: kept for edits of collate(), torch.cat and the like)
from transformers import AutoTokenizer

from utils import RowsDataset, UserError, load_rows, row_name

TEXT = "text"
PACK = True  # texts concatenated and cut into --max_len blocks (False: one padded example a text)
ROWS_PER_PACK = 1000  # run_clm's group_texts batch: the texts packed together


class Dataset(RowsDataset):
    """Rows of input_ids and attention_mask; RowsDataset reads them (len, [i], __getitems__,
    lengths)."""

    def __init__(self, rows, tokenizer):
        super().__init__(rows)
        self.labels = None  # no classes: build_model() takes the vocabulary from the model's config
        self.tokenizer = tokenizer

    def collate(self, samples):
        batch = self.tokenizer.pad(samples, padding_side="right", return_tensors="pt")
        # Padding is masked by the attention mask, not by pad_token_id: a tokenizer whose pad token
        # is its end-of-text token (GPT-2's) would otherwise never learn to end a text.
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def load_tokenizer(source, args):
    """The tokenizer of --model_name_or_path (or of the checkpoint, on --resume and in
    predict.py)."""
    # trust_remote_code=False: never run a folder's own code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    rows = load_rows(path, split, args.dataset_config)
    if TEXT not in rows.column_names:
        raise UserError(
            f"{path}: no '{TEXT}' column (found: {', '.join(rows.column_names)}). "
            f"Rename it, or change TEXT in dataset.py."
        )
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of --model_name_or_path {args.model_name_or_path} has no end-of-text "
            f"(eos) token, which this example appends to every text."
        )
    if tokenizer.pad_token is None:  # GPT-2 and many other causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token
    max_len = args.max_len  # not args itself: the cache key would then change with every option
    # Packed, nothing is cut: a long text runs on into the next block.
    limit = {} if PACK and not predicting else {"truncation": True, "max_length": max_len - 1}

    def encode(batch, indices):
        for i, text in zip(indices, batch[TEXT]):
            if not isinstance(text, str):
                raise UserError(f"{path}, {row_name(path, i)}: the '{TEXT}' field is not a string.")
        # Training skips blank texts (a batched map may return fewer rows); predict.py keeps them,
        # so that its output has one line per input row.
        texts = [text for text in batch[TEXT] if text.strip() or predicting]
        if not texts:
            return {"input_ids": [], "attention_mask": []}
        input_ids = [
            ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, **limit)["input_ids"]
        ]
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}

    # Cached by the datasets library: a second run with the same file, tokenizer and max_len reads
    # the tokens back instead of tokenizing again.
    rows = rows.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Tokenizing {path}",
    )
    if len(rows) == 0:
        raise UserError(f"{path}: every text in it is blank.")
    if PACK and not predicting:
        rows = rows.map(
            pack,
            batched=True,
            batch_size=ROWS_PER_PACK,
            fn_kwargs={"block": max_len},
            desc=f"Packing {path} into blocks of {max_len} tokens",
        )
    return Dataset(rows, tokenizer)


def pack(batch, block):
    """run_clm's group_texts: the batch's texts end to end, cut into blocks of `block` tokens; the
    remainder is a last, shorter block (run_clm drops it: here no token is lost)."""
    ids = [token for text in batch["input_ids"] for token in text]
    blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
    return {"input_ids": blocks, "attention_mask": [[1] * len(ids) for ids in blocks]}
