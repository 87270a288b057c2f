"""USER EDITS: the data. Example: token classification (named entities), one tag per word.

Copy it over the repository's dataset.py, with modeling.py beside it:

    cp examples/token_classification/{modeling,dataset}.py .

Reads a .jsonl, .json or .parquet file (or a hub dataset such as conll2003, see --dataset_config)
whose rows hold a list of words and a list of as many tags: {"tokens": ["Anna", "flew", "to",
"Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}. Change WORDS / TAGS below if your columns are
named otherwise (conll2003: TAGS = "ner_tags"; its ClassLabel ids are turned into their names).

Tags are BIO: O, or B-TYPE / I-TYPE for the first / a later word of an entity. The entity types
come from the training file and give the tag ids (see tag_names()), which modeling.py's metrics
read. A word that the tokenizer splits into several sub-tokens gets its tag on the first one; the
later ones and the special tokens ([CLS], [SEP]) get -100, which the loss and the metrics skip.

What train.py expects of this file (as for the default task):
  * `load_tokenizer(source, args)`: the tokenizer that generate_dataset() receives.
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` returns a torch
    Dataset whose `labels` are the tag names (index = tag id); build_model() puts them in the model
    config.
  * `Dataset.collate(samples)` pads a batch: input_ids, attention_mask, ..., labels (-100 on
    padding) and word_starts (1 on the first sub-token of each word: where predictions are read,
    also without labels).
  * `Dataset.lengths`: the length of each sample in tokens, for --group_by_length.
"""

import re

import datasets
import torch
from transformers import AutoTokenizer, DataCollatorForTokenClassification

from utils import RowsDataset, UserError, load_rows, row_name

WORDS, TAGS = "tokens", "tags"


def tag_names(entity_types):
    """The tag of each id: O is 0, then B-TYPE and I-TYPE of each type in turn (B odd, I even).
    modeling.py finds the entities in a sequence of tag ids by this layout."""
    return ["O"] + [f"{prefix}-{kind}" for kind in sorted(entity_types) for prefix in ("B", "I")]


class Dataset(RowsDataset):
    """Rows of input_ids, attention_mask, ..., labels, word_starts; RowsDataset reads them (len,
    [i], __getitems__, lengths)."""

    def __init__(self, rows, labels, tokenizer):
        super().__init__(rows)
        self.labels = labels  # the tag names, index = tag id
        self.pad = DataCollatorForTokenClassification(tokenizer)  # pads labels with -100
        self.padding_side = tokenizer.padding_side

    def collate(self, samples):
        word_starts = [sample.pop("word_starts") for sample in samples]
        batch = self.pad(samples)
        width = batch["input_ids"].shape[1]
        padded = [
            [0] * (width - len(s)) + s
            if self.padding_side == "left"
            else s + [0] * (width - len(s))
            for s in word_starts
        ]
        batch["word_starts"] = torch.tensor(padded)
        return batch


def load_tokenizer(source, args):
    """The tokenizer of --model_name_or_path (or of the checkpoint, on --resume and in
    predict.py)."""
    # trust_remote_code=False: never run a folder's own code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    if not tokenizer.is_fast:
        raise UserError(
            f"--model_name_or_path {args.model_name_or_path}: its tokenizer is not a fast "
            f"(tokenizers) one, which this example needs to map sub-tokens to words."
        )
    rows = load_rows(path, split, args.dataset_config)
    need_labels = not predicting or TAGS in rows.column_names
    for column in (WORDS, TAGS) if need_labels else (WORDS,):
        if column not in rows.column_names:
            raise UserError(
                f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change WORDS / TAGS in dataset.py."
            )
    # hub data: a list of ClassLabel ids
    feature = getattr(rows.features.get(TAGS), "feature", None)
    name_of = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
    if need_labels and labels is None:  # the training data decides the entity types
        types = set()
        for i, tags in enumerate(rows[TAGS]):
            for tag in tags or []:
                match = re.fullmatch(r"[BI]-(.+)", name_of(tag))
                if match:
                    types.add(match[1])
                elif name_of(tag) != "O":
                    raise UserError(
                        f"{path}, {row_name(path, i)}: tag '{name_of(tag)}' is not a BIO tag (O, "
                        f"B-TYPE, I-TYPE). Convert the tags, or change tag_names() and the metrics "
                        f"of modeling.py for another tag set."
                    )
        labels = tag_names(types)
    tag_ids = {name: i for i, name in enumerate(labels or [])}
    max_len = args.max_len  # not args itself: the cache key would then change with every option

    def encode(batch, indices):
        for i, words in zip(indices, batch[WORDS]):
            if (
                not isinstance(words, list)
                or not words
                or not all(isinstance(w, str) and w for w in words)
            ):
                raise UserError(
                    f"{path}, {row_name(path, i)}: '{WORDS}' must be a non-empty list of words."
                )
        encoded = tokenizer(
            batch[WORDS], is_split_into_words=True, truncation=True, max_length=max_len
        )
        encoded["word_starts"], encoded["labels"] = [], []
        for row, (i, words) in enumerate(zip(indices, batch[WORDS])):
            word_ids = encoded.word_ids(row)  # the word of each sub-token; None for [CLS], [SEP]
            seen = set(word_ids) - {None}
            # words with no sub-token (not the truncated ones)
            empty = [w for w in range(max(seen, default=-1) + 1) if w not in seen]
            # its tag would have no position to be read from, and the tags after it would shift
            if empty:
                raise UserError(
                    f"{path}, {row_name(path, i)}: word {empty[0] + 1} ({words[empty[0]]!r}) gives "
                    f"no token with this tokenizer (a space or an invisible character); remove it."
                )
            starts = [
                int(w is not None and (t == 0 or word_ids[t - 1] != w))
                for t, w in enumerate(word_ids)
            ]
            encoded["word_starts"].append(starts)
            if not need_labels:
                continue
            tags = [name_of(tag) for tag in batch[TAGS][row] or []]
            if len(tags) != len(words):
                raise UserError(
                    f"{path}, {row_name(path, i)}: {len(words)} words but {len(tags)} tags."
                )
            for tag in tags:
                if tag not in tag_ids:
                    raise UserError(
                        f"{path}, {row_name(path, i)}: tag '{tag}' is not among the training tags "
                        f"({', '.join(labels)})."
                    )
            encoded["labels"].append(
                [tag_ids[tags[w]] if start else -100 for w, start in zip(word_ids, starts)]
            )
        if not need_labels:
            del encoded["labels"]
        return encoded

    # Cached by the datasets library: a second run with the same file, tokenizer and max_len reads
    # the tokens back instead of tokenizing again.
    rows = rows.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Tokenizing {path}",
    )
    return Dataset(rows, labels, tokenizer)
