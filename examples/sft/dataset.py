"""USER EDITS: the data. Example: instruction tuning (SFT) of a causal LM on prompt / response
pairs.

Copy it over the repository's dataset.py, with modeling.py beside it:

    cp examples/sft/{modeling,dataset}.py .

Reads a .jsonl, .json, .csv, .tsv or .parquet file (or a hub dataset, see --dataset_config) with a
"prompt" and a "response" column (change PROMPT / RESPONSE below if yours are named otherwise).
Each pair becomes one user turn and one assistant turn in the tokenizer's chat template
(tokenizer_config.json / chat_template.jinja); a tokenizer without one gets FALLBACK_FORMAT and its
end-of-text token. The loss is on the response only: `labels` are the input ids with the prompt
(everything up to and including the assistant header) and the padding set to -100.

What train.py expects of this file (as for the default task):
  * `load_tokenizer(source, args)`: the tokenizer that generate_dataset() receives.
  * `generate_dataset(path, split, tokenizer, args, labels=None, predicting=False)` returns a torch
    Dataset; with predicting=True (predict.py) the prompt alone, ending on the assistant header (the
    generation prompt), and no response column is needed.
  * `Dataset.collate(samples)` pads a batch on the right: input_ids, attention_mask, labels (-100 on
    the prompt and the padding; the model shifts them by one position itself).
  * `Dataset.lengths`: the length of each sample, for --group_by_length.

PACK = True packs the training set: consecutive examples are concatenated into rows of up to
--max_len tokens (less padding, fewer steps for short examples). Attention does not cross from one
example into another: each packed row carries position_ids that restart at 0 for every example,
from which transformers builds a block-diagonal causal mask (for the models whose attention
implementations read them, GPT-2 and Llama among them; a model that ignores position_ids would let
attention cross). The validation set and predict.py are never packed: metrics are per example.
"""

import signal
import threading
from pathlib import Path

import jinja2
import torch
from transformers import AutoTokenizer

from utils import RowsDataset, UserError, load_rows, row_name

PROMPT, RESPONSE = "prompt", "response"
# for a tokenizer without a chat template
FALLBACK_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"
PACK = False  # True: pack the training set into rows of up to --max_len tokens (see above)


class Dataset(RowsDataset):
    """Rows of input_ids and labels (and position_ids if packed); RowsDataset reads them (len, [i],
    __getitems__, lengths)."""

    def __init__(self, rows, tokenizer):
        super().__init__(rows)
        self.labels = None  # no classes: build_model() takes the vocabulary from the model's config
        self.tokenizer = tokenizer

    def collate(self, samples):
        width = max(len(s["input_ids"]) for s in samples)

        def pad(key, value):
            return torch.tensor([s[key] + [value] * (width - len(s[key])) for s in samples])

        batch = {"input_ids": pad("input_ids", self.tokenizer.pad_token_id)}
        # packed rows (a plain one is a row of one example)
        if any("position_ids" in s for s in samples):
            # Positions restart for every example and for the padding; transformers reads the
            # restarts as example boundaries when there is no attention mask and no cache (use_cache
            # off: the config's default would give the model one, and a causal mask across them).
            batch["position_ids"] = torch.tensor(
                [
                    s.get("position_ids", list(range(len(s["input_ids"]))))
                    + list(range(width - len(s["input_ids"])))
                    for s in samples
                ]
            )
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in samples]
            )
        if "labels" in samples[0]:
            batch["labels"] = pad("labels", -100)
        return batch


def load_tokenizer(source, args):
    """The tokenizer of --model_name_or_path (or of the checkpoint, on --resume and in
    predict.py)."""
    # trust_remote_code=False: never run a folder's own code
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


TEMPLATE_SECONDS = 2.0  # the longest one rendering of the chat template may take (usual: < 1 ms)


class TemplateTimeout(Exception):
    pass


def render(tokenizer, messages, **options):
    """tokenizer.apply_chat_template(messages, tokenize=False), bounded in time: the template comes
    with the model folder or checkpoint, and one that loops for hours (nested range()s) or probes
    attributes (jinja2's sandbox stops it with a SecurityError) is one line naming its file. The
    bound is a SIGALRM timer, so it holds in the main thread (datasets.map's, predict.py's) only."""

    def expired(signum, frame):
        raise TemplateTimeout

    bounded = threading.current_thread() is threading.main_thread()
    if bounded:
        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except (TemplateTimeout, jinja2.TemplateError) as e:
        why = (
            f"ran over {TEMPLATE_SECONDS:g} s on one prompt"
            if isinstance(e, TemplateTimeout)
            else f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        )
        source = Path(tokenizer.name_or_path)
        file = source / "chat_template.jinja"
        file = file if file.is_file() else source / "tokenizer_config.json"
        raise UserError(
            f"the chat template of {file} {why}. Fix or remove that template (without one, "
            f"dataset.py's FALLBACK_FORMAT is used), or use another --model_name_or_path."
        ) from None
    finally:
        if bounded:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def formatted(tokenizer, prompt, response=None):
    """The text of the prompt as the model sees it before answering (the generation prompt), and
    with the response appended (None in predict mode)."""
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        start = render(tokenizer, user, add_generation_prompt=True)
        whole = (
            None
            if response is None
            else render(tokenizer, user + [{"role": "assistant", "content": response}])
        )
        return start, whole
    start = FALLBACK_FORMAT.format(prompt=prompt)
    return start, None if response is None else start + response + tokenizer.eos_token


def encode_pair(tokenizer, prompt, response):
    """The input ids and how many of the first are the prompt's (the loss skips them)."""
    start, whole = formatted(tokenizer, prompt, response)
    # The template writes the special tokens itself (a BOS included): the tokenizer adds none.
    prompt_ids = tokenizer(start, add_special_tokens=False)["input_ids"]
    if response is None:
        return prompt_ids, len(prompt_ids)
    if not whole.startswith(start):
        raise UserError(
            f"the chat template of the tokenizer does not continue its generation prompt with "
            f"the assistant's reply ({start!r} does not start {whole!r}): the response cannot "
            f"be told from the prompt."
        )
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        # A BPE merge across the boundary: the prompt's own tokens, then the reply's, which is what
        # the model reads and writes when it generates after the prompt.
        ids = prompt_ids + tokenizer(whole[len(start) :], add_special_tokens=False)["input_ids"]
    return ids, len(prompt_ids)


def pack(rows, max_len):
    """Consecutive examples concatenated into rows of up to max_len tokens (a batched datasets.map):
    position_ids restart at 0 for each example, and the first token of each is a prompt token, so no
    label of one example is predicted from the last token of the one before."""
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        if not packed["input_ids"] or len(packed["input_ids"][-1]) + len(ids) > max_len:
            for values in packed.values():
                values.append([])
        packed["input_ids"][-1] += ids
        packed["labels"][-1] += labels
        packed["position_ids"][-1] += list(range(len(ids)))
    return packed


def generate_dataset(path, split, tokenizer, args, labels=None, predicting=False):
    rows = load_rows(path, split, args.dataset_config)
    columns = (PROMPT,) if predicting else (PROMPT, RESPONSE)
    for column in columns:
        if column not in rows.column_names:
            raise UserError(
                f"{path}: no '{column}' column (found: {', '.join(rows.column_names)}). "
                f"Rename it, or change PROMPT / RESPONSE in dataset.py."
            )
    if tokenizer.eos_token is None:
        raise UserError(
            f"the tokenizer of {args.model_name_or_path} has no end-of-text (eos) token, which "
            f"ends every response (and stops generation). Set eos_token in its "
            f"tokenizer_config.json."
        )
    if tokenizer.pad_token is None:  # GPT-2 and many other causal LMs ship without one
        # harmless: padding is masked by position, not by id
        tokenizer.pad_token = tokenizer.eos_token
    max_len = args.max_len  # not args itself: the cache key would then change with every option

    def encode(batch, indices):
        encoded = {"input_ids": []} if predicting else {"input_ids": [], "labels": []}
        for i, *fields in zip(indices, *(batch[column] for column in columns)):
            for column, value in zip(columns, fields):
                if not isinstance(value, str) or not value.strip():
                    what = (
                        "missing"
                        if value is None
                        else "empty"
                        if isinstance(value, str)
                        else "not a string"
                    )
                    raise UserError(f"{path}, {row_name(path, i)}: the '{column}' field is {what}.")
            ids, prompt_length = encode_pair(
                tokenizer, fields[0], None if predicting else fields[1]
            )
            if prompt_length >= max_len:
                raise UserError(
                    f"{path}, {row_name(path, i)}: the prompt is {prompt_length} tokens as "
                    f"formatted, which leaves no room for the response within --max_len {max_len}. "
                    f"Raise --max_len or shorten the prompt."
                )
            # a long response is cut: its end is not learnt
            encoded["input_ids"].append(ids[:max_len])
            if not predicting:  # the loss skips the prompt: its labels are -100
                encoded["labels"].append(([-100] * prompt_length + ids[prompt_length:])[:max_len])
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
    if PACK and split == args.train_split and not predicting:
        rows = rows.map(pack, batched=True, fn_kwargs={"max_len": max_len}, desc=f"Packing {path}")
    return Dataset(rows, tokenizer)
