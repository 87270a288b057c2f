"""USER EDITS: the model. Example: instruction tuning (SFT) of a causal LM: from scratch with the
tiny chat GPT-2 of examples/sft/tiny-gpt2-chat, or fine-tuning any causal LM of the hub (full, or
--lora_r adapters).

Copy it over the repository's modeling.py, with dataset.py beside it:

    cp examples/sft/{modeling,dataset}.py .

What train.py expects of this file (as for the default task):
  * `build_model(model_name_or_path, train_set)` returns the model to train.
  * `Model.forward(**batch)` returns a ModelOutput with `.loss`: the mean cross-entropy of each next
    token that has a label, which the hub's causal LMs compute themselves; dataset.py gives labels
    on the response only, so the loss is the response's.
  * `Model.from_pretrained(dir)` loads a trained checkpoint without train.py.
  * `loss_items(batch)`: the loss is a mean over the response tokens, and this counts them, so that
    train.py weighs every token of an optimizer step alike however its batch is split.
  * `metric_inputs(model, tokenizer, batch, outputs)` / `compute_metrics(gathered)`: exact_match,
    the share of validation prompts whose greedily generated reply is the gold response.
  * `format_samples(...)`: for --sample_every, prompt / generated / gold of a few training examples.
  * `predictions(model, tokenizer, batch, outputs)`: a generated response per prompt, for
    predict.py.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from utils import generate as generate_with
from utils import has_weights

# The hub's own causal LM classes (GPT-2, Llama, ...) already are what train.py needs: forward()
# takes input_ids, attention_mask (or position_ids) and labels and returns the loss, generate()
# writes a reply, and from_pretrained() builds the class that a checkpoint's config.json names.
Model = AutoModelForCausalLM
MAX_NEW_TOKENS = 32  # predict.py: the longest reply written (it ends earlier at the eos token)


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (examples/sft/tiny-gpt2-chat) gives a randomly
    initialised model; a hub id or a directory with weights (a checkpoint such as model/best) gives
    that model."""
    # train.py refuses a --max_len beyond its positions
    config = AutoConfig.from_pretrained(model_name_or_path)
    model = (
        Model.from_pretrained(model_name_or_path)
        if has_weights(model_name_or_path)
        else Model.from_config(config)
    )
    vocabulary = len(train_set.tokenizer)
    # a tokenizer with added (chat) tokens
    if vocabulary > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocabulary)
    return model


def loss_items(batch):
    """Per example, the tokens its loss is a mean over: those with a label (the response), bar the
    first position (position t predicts token t + 1)."""
    return (batch["labels"][:, 1:] != -100).sum(1)


def until_end(ids, end):
    """The tokens up to and including the first `end` (the eos token), as a list."""
    ids = ids.tolist()
    return ids[: ids.index(end) + 1] if end in ids else ids


def prompts_and_replies(batch):
    """Per row, the prompt's tokens and the gold reply's: the labels start where the reply starts,
    and the reply is their first run without -100 (a packed row's first example). Without labels
    (predict.py), the row's tokens are all prompt."""
    rows = []
    for i, ids in enumerate(batch["input_ids"]):
        if "labels" not in batch:
            rows.append((ids[batch["attention_mask"][i].bool()], None))
            continue
        answered = (batch["labels"][i] != -100).long()
        start = int(answered.argmax())  # the first labelled token
        end = start + int(answered[start:].cumprod(0).sum())  # up to the next unlabelled one
        rows.append((ids[:start], ids[start:end]))
    return rows


def generate(model, tokenizer, prompts, max_new_tokens):
    """Greedy replies to a list of prompts (token tensors of different lengths), one batch: a
    decoder-only model continues each row at its end, so the prompts are padded on the left."""
    batch = tokenizer.pad(
        {"input_ids": [p.tolist() for p in prompts]}, padding_side="left", return_tensors="pt"
    )
    batch = {k: v.to(model.device) for k, v in batch.items()}
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:  # a reply that would run past the last position stops there
        max_new_tokens = max(1, min(max_new_tokens, positions - batch["input_ids"].shape[1]))
    generated = generate_with(  # greedy, one reply a prompt, whatever generation_config.json says
        model,
        batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [
        until_end(row, tokenizer.eos_token_id)
        for row in generated[:, batch["input_ids"].shape[1] :]
    ]


def metric_inputs(model, tokenizer, batch, outputs):
    """Per example, 1.0 if the greedy reply to its prompt, up to its eos token, is exactly the gold
    reply's tokens, else 0.0. It generates as long as the longest gold reply of the batch: a longer
    reply cannot match."""
    prompts, golds = zip(*prompts_and_replies(batch))
    golds = [until_end(gold, tokenizer.eos_token_id) for gold in golds]
    replies = generate(model, tokenizer, prompts, max(len(gold) for gold in golds))
    exact = [float(reply == gold) for reply, gold in zip(replies, golds)]
    return {"exact_match": torch.tensor(exact, device=batch["input_ids"].device)}


def compute_metrics(gathered):
    # Higher is better: train.py takes --metric_for_best exact_match that way (no part like loss or
    # error).
    return {"exact_match": gathered["exact_match"].mean().item()}


def format_samples(model, tokenizer, batch, outputs, k):
    rows = prompts_and_replies(
        {key: value[:k] for key, value in batch.items() if torch.is_tensor(value)}
    )
    replies = generate(model, tokenizer, [prompt for prompt, _ in rows], MAX_NEW_TOKENS)
    return [
        f"prompt: {tokenizer.decode(prompt, skip_special_tokens=True)}\n"
        f"  generated: {tokenizer.decode(reply, skip_special_tokens=True)}\n"
        f"  gold: {tokenizer.decode(gold, skip_special_tokens=True)}"
        for (prompt, gold), reply in zip(rows, replies)
    ]


def predictions(model, tokenizer, batch, outputs):
    replies = generate(
        model, tokenizer, [prompt for prompt, _ in prompts_and_replies(batch)], MAX_NEW_TOKENS
    )
    return [{"response": tokenizer.decode(reply, skip_special_tokens=True)} for reply in replies]
