"""USER EDITS: the model. Example: sequence to sequence (an encoder reads the source, a decoder
writes the target), from scratch with the tiny T5 of examples/seq2seq/tiny-t5, or fine-tuning a T5
of the hub (t5-small, google/flan-t5-small, ...).

Copy it over the repository's modeling.py, with dataset.py beside it:

    cp examples/seq2seq/{modeling,dataset}.py .

What train.py expects of this file (as for the default task):
  * `build_model(model_name_or_path, train_set)` returns the model to train.
  * `Model.forward(**batch)` returns a ModelOutput with `.loss`: the mean cross-entropy of each
    target token given the source and the target tokens before it (T5 computes it from `labels`).
  * `Model.from_pretrained(dir)` loads a trained checkpoint without train.py, and `generate()`
    writes.
  * `loss_items(batch)`: the loss is a mean over target tokens, and this counts them.
  * `metric_inputs(model, tokenizer, batch, outputs)` / `compute_metrics(gathered)`: exact match and
    chrF of the GENERATED targets (greedy), not of the teacher-forced logits.
  * `format_samples(...)`: for --sample_every, each source with its generated and its gold target.
  * `predictions(model, tokenizer, batch, outputs)`: for predict.py, the generated target of each
    row (and whether it is exactly the row's target, where the file has one).
"""

from collections import Counter

import torch
from transformers import AutoConfig, T5ForConditionalGeneration

from utils import UserError, has_weights
from utils import generate as generate_with

MAX_NEW_TOKENS = 32  # the longest target generate() writes, in tokens: raise it for longer targets
CHRF_ORDER, CHRF_BETA = 6, 2  # sacrebleu's default chrF: character 1- to 6-grams, recall weighs 2x


class Model(T5ForConditionalGeneration):
    """T5 as the hub has it, plus one thing: predict.py calls model(**batch) on rows without a
    target, and T5 then has no decoder input at all. It is given the start token alone (generation
    makes the real outputs). For BART, Marian, ... subclass their ...ForConditionalGeneration in the
    same way."""

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, decoder_input_ids=None, **kwargs
    ):
        if (
            labels is None
            and decoder_input_ids is None
            and kwargs.get("decoder_inputs_embeds") is None
        ):
            rows = len(input_ids if input_ids is not None else kwargs["inputs_embeds"])
            decoder_input_ids = torch.full(
                (rows, 1), self.config.decoder_start_token_id, device=self.device
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            **kwargs,
        )


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (examples/seq2seq/tiny-t5) gives a randomly initialised
    T5; a hub id (t5-small) or a directory with weights gives that pretrained model."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False)
    if config.model_type != Model.config_class.model_type:
        raise UserError(
            f"{model_name_or_path} is a {config.model_type} model, and Model in modeling.py is a "
            f"T5: change its base class to the {config.model_type} ...ForConditionalGeneration."
        )
    pretrained = has_weights(model_name_or_path)
    model = (
        Model.from_pretrained(model_name_or_path, trust_remote_code=False)
        if pretrained
        else Model(config)
    )
    vocabulary = len(train_set.tokenizer)
    if vocabulary > model.get_input_embeddings().num_embeddings:  # a tokenizer with added tokens
        model.resize_token_embeddings(vocabulary)
    return model


def loss_items(batch):
    """Per example, the target tokens its loss is a mean over (T5 shifts the labels itself: all
    count)."""
    return (batch["labels"] != -100).sum(1)


def generate(model, tokenizer, batch):
    """The greedy target of each source of the batch, as text."""
    ids = generate_with(  # greedy, one target a source, whatever generation_config.json says
        model,
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=model.config.decoder_start_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def gold(tokenizer, batch):
    """The target of each example, as text: its labels decoded (-100 is padding)."""
    labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id)
    return tokenizer.batch_decode(labels, skip_special_tokens=True)


def chrf_statistics(hypothesis, reference):
    """Per character n-gram order 1..6: [n-grams in the hypothesis, in the reference, matched],
    spaces removed, as sacrebleu's chrF counts them (the hypothesis' n-grams only where the
    reference is that long). Summed over examples they give the corpus chrF."""
    hypothesis, reference = "".join(hypothesis.split()), "".join(reference.split())
    statistics = []
    for n in range(1, CHRF_ORDER + 1):
        hyp = Counter(hypothesis[i : i + n] for i in range(len(hypothesis) - n + 1))
        ref = Counter(reference[i : i + n] for i in range(len(reference) - n + 1))
        # &: the smaller count
        statistics.append([hyp.total() if ref else 0, ref.total(), (hyp & ref).total()])
    return statistics


def chrf(statistics):
    """chrF (0-100) from [hypothesis, reference, matched] counts per order, as sacrebleu computes
    it: precision and recall averaged over the orders that both sides have, then their F-beta."""
    precisions, recalls = [], []
    for hyp, ref, matched in statistics:
        if hyp > 0 and ref > 0:
            precisions.append(matched / hyp)
            recalls.append(matched / ref)
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + CHRF_BETA**2) * precision * recall / (CHRF_BETA**2 * precision + recall)


def metric_inputs(model, tokenizer, batch, outputs):
    # Per example, fixed-size counts (not the generated tokens, whose number varies): train.py
    # gathers them from every process, and summed they give the corpus-level scores.
    generated, targets = generate(model, tokenizer, batch), gold(tokenizer, batch)
    device = batch["labels"].device
    return {
        "exact": torch.tensor([g == t for g, t in zip(generated, targets)], device=device),
        "chrf_statistics": torch.tensor(
            [chrf_statistics(g, t) for g, t in zip(generated, targets)], device=device
        ),
    }  # (examples, 6 orders, 3 counts)


def compute_metrics(gathered):
    # Higher is better for both: --metric_for_best exact_match (or chrf) keeps the best epoch by it.
    return {
        "exact_match": gathered["exact"].double().mean().item(),
        "chrf": chrf(gathered["chrf_statistics"].sum(0).tolist()),
    }


def format_samples(model, tokenizer, batch, outputs, k):
    batch = {key: value[:k] for key, value in batch.items()}
    sources = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return [
        f"input: {source}\n  generated: {generated}\n  gold: {target}"
        for source, generated, target in zip(
            sources, generate(model, tokenizer, batch), gold(tokenizer, batch)
        )
    ]


def predictions(model, tokenizer, batch, outputs):
    generated = generate(model, tokenizer, batch)
    if "labels" not in batch:  # the file has no target column
        return [{"generated": text} for text in generated]
    return [
        {"generated": text, "target": target, "exact_match": text == target}
        for text, target in zip(generated, gold(tokenizer, batch))
    ]
