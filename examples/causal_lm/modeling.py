"""USER EDITS: the model. Example: causal language modelling (predict each next token), from scratch
with the tiny GPT-2 of examples/causal_lm/tiny-gpt2, or fine-tuning any causal LM of the hub.

Copy it over the repository's modeling.py, with dataset.py beside it:

    cp examples/causal_lm/{modeling,dataset}.py .

What train.py expects of this file (as for the default task):
  * `build_model(model_name_or_path, train_set)` returns the model to train.
  * `Model.forward(**batch)` returns a ModelOutput with `.loss`: here the mean cross-entropy of
    each next token, which the hub's causal LMs compute themselves from `labels`.
  * `Model.from_pretrained(dir)` loads a trained checkpoint without train.py.
  * `loss_items(batch)`: the loss is a mean over tokens, and this counts them, so that train.py
    weighs every token of an optimizer step alike however its batch is split.
  * `metric_inputs(model, tokenizer, batch, outputs)` / `compute_metrics(gathered)`: the validation
    perplexity.
  * `format_samples(...)`: for --sample_every, a greedy continuation of the first tokens of a text.
  * `predictions(model, tokenizer, batch, outputs)`: each text's loss and perplexity, for
    predict.py.
"""

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from utils import generate as generate_with
from utils import has_weights

# The hub's own causal LM classes (GPT-2, Llama, ...) already are what train.py needs: forward()
# takes input_ids, attention_mask and labels and returns the loss, and from_pretrained() builds the
# class that a checkpoint's config.json names. Model.from_pretrained("model/best") gives a
# GPT2LMHeadModel here. To change the architecture, write a PreTrainedModel as in the default
# modeling.py (it then needs GenerationMixin as a base class for format_samples' generate()).
Model = AutoModelForCausalLM
# --sample_every: continue the first 4 tokens of a text by 16 at most
PROMPT_TOKENS, NEW_TOKENS = 4, 16


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (examples/causal_lm/tiny-gpt2) gives a randomly
    initialised model; a hub id (gpt2) or a directory with weights gives that pretrained model."""
    # train.py refuses a --max_len beyond its positions
    config = AutoConfig.from_pretrained(model_name_or_path)
    pretrained = has_weights(model_name_or_path)
    model = Model.from_pretrained(model_name_or_path) if pretrained else Model.from_config(config)
    vocabulary = len(train_set.tokenizer)
    if vocabulary > model.get_input_embeddings().num_embeddings:  # a tokenizer with added tokens
        model.resize_token_embeddings(vocabulary)
    return model


def loss_items(batch):
    """Per text, the tokens its loss is a mean over: all but the first (position t predicts token
    t + 1) and the padding (-100)."""
    return (batch["labels"][:, 1:] != -100).sum(1)


def token_losses(batch, outputs):
    """Each text's summed next-token loss (float32) and its number of predicted tokens."""
    # position t predicts token t + 1
    logits, targets = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
    losses = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses.sum(1), (targets != -100).sum(1)


def metric_inputs(model, tokenizer, batch, outputs):
    # Per text, not per token: the texts of a batch differ in length, and train.py gathers along the
    # first dimension only. Sums and counts add up to the token-weighted mean over the whole set.
    loss_sum, tokens = token_losses(batch, outputs)
    return {"loss_sum": loss_sum, "tokens": tokens}


def compute_metrics(gathered):
    token_loss = (gathered["loss_sum"].sum() / gathered["tokens"].sum()).item()
    # Lower is better: train.py takes --metric_for_best perplexity that way (a part of
    # LOWER_IS_BETTER).
    return {"perplexity": math.exp(min(token_loss, 700.0))}  # exp(700) is about the largest float


def format_samples(model, tokenizer, batch, outputs, k):
    samples = []
    for ids, mask in zip(batch["input_ids"][:k], batch["attention_mask"][:k]):
        ids = ids[mask.bool()]
        # A packed block starts and ends mid-text: show its first whole one (between two ends).
        ends = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
        if len(ends) >= 2:
            ids = ids[ends[0] + 1 : ends[1] + 1]
        prompt = ids[: min(PROMPT_TOKENS, max(1, len(ids) // 2))].unsqueeze(0)
        generated = generate_with(  # greedy, whatever generation_config.json says
            model,
            {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        continuation = generated[0, prompt.shape[1] :]
        samples.append(
            f"prompt: {tokenizer.decode(prompt[0], skip_special_tokens=True)}\n"
            f"  generated: {tokenizer.decode(continuation, skip_special_tokens=True)}\n"
            f"  gold: {tokenizer.decode(ids[prompt.shape[1] :], skip_special_tokens=True)}"
        )
    return samples


def predictions(model, tokenizer, batch, outputs):
    loss_sum, tokens = token_losses(batch, outputs)
    mean = (loss_sum / tokens.clamp(min=1)).tolist()
    return [
        {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 700.0)), 6), "tokens": n}
        for loss, n in zip(mean, tokens.tolist())
    ]
