"""USER EDITS: the data. Example: extractive question answering (SQuAD's layout): the answer is a
span of the context, found by its first and last token.

Copy it over the repository's dataset.py, with modeling.py beside it:

    cp examples/question_answering/{modeling,dataset}.py .

Reads a .jsonl, .json or .parquet file (or a hub dataset with SQuAD's columns) with one question a
row: {"context": "...", "question": "...", "answers": {"text": ["Velm"], "answer_start": [278]}},
answer_start counting characters of the context from 0 (several gold answers may be given, as in
SQuAD's validation set; the first one is trained on). Change CONTEXT / QUESTION / ANSWERS below if
your columns are named otherwise.

A context longer than --max_len is cut into **windows**: each is [CLS] question [SEP] a part of the
context [SEP], and consecutive windows share DOC_STRIDE tokens of the context, so an answer cut by
the end of one window is whole in the next. Every window is an example of its own (len(dataset)
counts windows, not questions). Its start_positions / end_positions are the tokens of the answer
when the answer lies wholly inside the window, else 0 ([CLS]: "not here"), as Hugging Face's
run_qa.py trains.

What train.py expects of this file (as for the default task):
  * `load_tokenizer(source, args)`: the tokenizer that generate_dataset() receives; a fast one (its
    offsets map tokens back to characters of the context).
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` returns a torch
    Dataset of windows. predict.py needs no answers column.
  * `Dataset.collate(samples)` pads a batch: input_ids, token_type_ids, attention_mask (made per
    batch), start_positions / end_positions (without answers: absent). Beside those tensors ride
    values that are not tensors, one per window, as plain lists: "row" (the question's row in the
    file), "offsets" (each token's [start, end] characters in the context; None for the question
    and special tokens), "context", "question" and "answers" (the gold texts). train.py passes a
    value that is not a tensor to forward() only if forward() names it (BERT's does not), so they
    reach the hooks of modeling.py alone; predict.py joins the windows of one row by "row".
  * `Dataset.lengths`: the tokens of each window, for --group_by_length.
"""

from transformers import AutoTokenizer

from utils import RowsDataset, UserError, load_rows, row_name

CONTEXT, QUESTION, ANSWERS = "context", "question", "answers"
# Tokens of the context shared by consecutive windows (Hugging Face's `stride`): an answer up to
# this long that a window's end cuts is whole in the next window.
DOC_STRIDE = 16
ALONG = ("row", "offsets", "context", "question", "answers")  # for the hooks, not tensors


class Dataset(RowsDataset):
    """Rows of windows (input_ids, token_type_ids, start/end_positions and the values of ALONG);
    RowsDataset reads them (len, [i], __getitems__, lengths)."""

    def __init__(self, rows, tokenizer):
        super().__init__(rows)
        self.labels = None  # no classes
        self.tokenizer = tokenizer  # build_model() checks the model's vocabulary against it

    def collate(self, samples):
        tensors = [{k: v for k, v in s.items() if k not in ALONG} for s in samples]
        # input_ids and token_type_ids padded, attention_mask made, positions made tensors
        batch = dict(self.tokenizer.pad(tensors, return_tensors="pt"))
        batch.update({key: [s[key] for s in samples] for key in ALONG if key in samples[0]})
        return batch


def load_tokenizer(source, args):
    """The tokenizer of --model_name_or_path (or of the checkpoint, on --resume and in
    predict.py)."""
    # trust_remote_code=False: never run a folder's own code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def check_row(path, i, context, question, answers):
    """One line naming the file and the row for a row that is not a SQuAD question; `answers` None:
    not read (predict.py without an answers column)."""
    where = f"{path}, {row_name(path, i)}"
    for column, text in ((CONTEXT, context), (QUESTION, question)):
        if not isinstance(text, str) or not text.strip():
            what = "missing" if text is None else "empty" if isinstance(text, str) else "not a text"
            raise UserError(f"{where}: the '{column}' field is {what}.")
    if answers is None:
        return
    texts, starts = (answers or {}).get("text"), (answers or {}).get("answer_start")
    if not texts or not isinstance(texts, list) or not isinstance(starts, list):
        raise UserError(
            f"{where}: the '{ANSWERS}' field needs a non-empty list 'text' and as long a list "
            f"'answer_start'; questions without an answer (SQuAD 2.0's) are not handled by this "
            f"example."
        )
    if len(texts) != len(starts):
        raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start.")
    for n, (text, start) in enumerate(zip(texts, starts), 1):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: answer {n} is empty or not a text.")
        if not isinstance(start, int) or context[start : start + len(text)] != text:
            found = context[start : start + len(text)] if isinstance(start, int) else None
            raise UserError(
                f"{where}: answer {n} ({text!r}) is not at answer_start {start!r} of the context "
                f"(found {found!r} there); answer_start counts characters of the context from 0."
            )


def answer_tokens(offsets, start, end):
    """The first and last token of characters [start, end) of the context, if the window holds
    them all (offsets: None outside the context); else (0, 0), the [CLS] token."""
    inside = [t for t, span in enumerate(offsets) if span is not None]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return 0, 0  # not wholly in this window
    covering = [t for t in inside if offsets[t][0] < end and offsets[t][1] > start]
    return (covering[0], covering[-1]) if covering else (0, 0)


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    if not tokenizer.is_fast:
        raise UserError(
            f"--model_name_or_path {args.model_name_or_path}: its tokenizer is not a fast "
            f"(tokenizers) one, which this example needs to map tokens to characters of the "
            f"context."
        )
    rows = load_rows(path, split, args.dataset_config)
    with_answers = not predicting or ANSWERS in rows.column_names  # predict.py: optional
    for column in (CONTEXT, QUESTION, ANSWERS) if with_answers else (CONTEXT, QUESTION):
        if column not in rows.column_names:
            raise UserError(
                f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change CONTEXT / QUESTION / ANSWERS in dataset.py."
            )
    max_len = args.max_len  # not args itself: the cache key would then change with every option
    # [CLS] question [SEP] context [SEP]: what a window leaves of --max_len to the context
    room = max_len - tokenizer.num_special_tokens_to_add(pair=True) - DOC_STRIDE

    def encode(batch, indices):
        answers = batch[ANSWERS] if with_answers else [None] * len(indices)
        for i, context, question, gold in zip(indices, batch[CONTEXT], batch[QUESTION], answers):
            check_row(path, i, context, question, gold)
        questions = tokenizer(batch[QUESTION], add_special_tokens=False).input_ids
        for i, length in zip(indices, map(len, questions)):
            if length >= room:  # no window could hold the question and advance in the context
                raise UserError(
                    f"{path}, {row_name(path, i)}: the question is {length} tokens, too long for "
                    f"--max_len {max_len}: a window holds at most {room - 1} of the question "
                    f"beside [CLS], [SEP] and more than DOC_STRIDE ({DOC_STRIDE}) tokens of "
                    f"context. Raise --max_len or shorten the question."
                )
        encoded = tokenizer(
            batch[QUESTION],
            batch[CONTEXT],
            truncation="only_second",  # the context is cut into windows, never the question
            max_length=max_len,
            stride=DOC_STRIDE,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_attention_mask=False,  # made per batch by collate()
        )
        # token_type_ids: 0 on the question, 1 on the context, for the models that have them (BERT;
        # not RoBERTa)
        tokens = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        windows = {key: [] for key in (*tokens, *ALONG)}
        windows |= {"start_positions": [], "end_positions": []} if with_answers else {}
        for w, row in enumerate(encoded["overflow_to_sample_mapping"]):
            # the characters of the context of each token; None for the question and [CLS]/[SEP]
            offsets = [
                list(span) if sequence == 1 else None
                for span, sequence in zip(encoded["offset_mapping"][w], encoded.sequence_ids(w))
            ]
            for key in tokens:
                windows[key].append(encoded[key][w])
            windows["row"].append(indices[row])
            windows["offsets"].append(offsets)
            windows["context"].append(batch[CONTEXT][row])
            windows["question"].append(batch[QUESTION][row])
            windows["answers"].append(answers[row]["text"] if with_answers else [])
            if with_answers:  # the first gold answer is the one trained on
                start = answers[row]["answer_start"][0]
                first, last = answer_tokens(offsets, start, start + len(answers[row]["text"][0]))
                windows["start_positions"].append(first)
                windows["end_positions"].append(last)
        return windows

    # Cached by the datasets library: a second run with the same file, tokenizer, max_len and
    # DOC_STRIDE reads the windows back instead of tokenizing again.
    rows = rows.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Windows of {path}",
    )
    return Dataset(rows, tokenizer)
