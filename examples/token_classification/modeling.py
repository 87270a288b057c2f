"""USER EDITS: the model. Example: token classification (named entities): an encoder and a linear
head on every token, trained from scratch with examples/token_classification/tiny-bert-ner or on top
of a pretrained encoder (bert-base-cased).

Copy it over the repository's modeling.py, with dataset.py beside it:

    cp examples/token_classification/{modeling,dataset}.py .

What train.py expects of this file (as for the default task):
  * `build_model(model_name_or_path, train_set)` returns the model; the tag names of the training
    data become config.id2label / label2id, so a checkpoint knows them.
  * `Model.forward(**batch)` returns a ModelOutput with `.loss`: the cross-entropy of each word's
    tag, read at its first sub-token (labels -100 elsewhere).
  * `Model.from_pretrained(dir)` loads a trained checkpoint without train.py.
  * `loss_items(batch)`: the loss is a mean over words, and this counts them, so that train.py
    weighs every word of an optimizer step alike however its batch is split.
  * `metric_inputs(model, tokenizer, batch, outputs)` / `compute_metrics(gathered)`: word accuracy,
    and precision, recall and F1 of whole entities (exact type and span, as seqeval and conlleval
    count them).
  * `format_samples(...)` shows the predicted and the gold entities of a few sentences;
    `predictions(model, tokenizer, batch, outputs)` gives each sentence's tags, one per word, for
    predict.py.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from utils import has_weights


class ModelConfig(PretrainedConfig):
    model_type = "template-token-classifier"

    def __init__(self, encoder=None, classifier_dropout=0.1, **kwargs):
        # the backbone's own config, as a dict (config.json of BERT etc.)
        self.encoder = encoder or {}
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (batch, tokens, tags)


class Model(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config)
        # unused: the head reads every token (an unused layer would make DDP fail)
        self.encoder.pooler = None
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, labels=None, word_starts=None, **inputs):
        # word_starts is not an input of the network: it rides along in the batch for predictions().
        logits = self.head(self.dropout(self.encoder(**inputs).last_hidden_state))
        loss = None
        # -100 (later sub-tokens, [CLS], [SEP], padding) is left out of the mean
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100
            )
        return TokenClassifierOutput(loss=loss, logits=logits)


def loss_items(batch):
    """Per sentence, the words its loss is a mean over: the labels that are not -100."""
    return (batch["labels"] != -100).sum(1)


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (tiny-bert-ner) gives a randomly initialised encoder; a
    hub id or a directory with weights gives that pretrained encoder under a new head."""
    labels = train_set.labels
    encoder_config = AutoConfig.from_pretrained(model_name_or_path)
    config = ModelConfig(
        encoder=encoder_config.to_dict(),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = Model(config)
    pretrained = has_weights(model_name_or_path)
    if pretrained:
        model.encoder = AutoModel.from_pretrained(model_name_or_path)
        model.encoder.pooler = None
    return model


def entities(tag_ids):
    """The (start, end, type) of each entity in one sentence's tag ids, one per word, laid out as
    dataset.tag_names() does (0 = O, odd = B-type, even = I-type). An entity begins at a B, or at an
    I that does not continue an entity of its type (as seqeval and conlleval read it)."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tag_ids, 0]):  # the final O closes the last entity
        tag_kind = (tag - 1) // 2
        continues = tag > 0 and tag % 2 == 0 and tag_kind == kind
        if start is not None and not continues:
            found.add((start, i, kind))
            start = kind = None
        if tag > 0 and not continues:
            start, kind = i, tag_kind
    return found


def metric_inputs(model, tokenizer, batch, outputs):
    # Fixed-size counts per sentence, not tags per token: sentences differ in length within and
    # across processes, and train.py gathers along the first dimension only.
    types = (outputs.logits.shape[-1] - 1) // 2
    words = batch["labels"] != -100  # each word's first sub-token
    predicted = outputs.logits.argmax(-1)
    # sentence after sentence
    gold_tags, predicted_tags = batch["labels"][words].tolist(), predicted[words].tolist()
    # per type: correct, predicted, gold
    counts = torch.zeros(len(words), types, 3, dtype=torch.long)
    start = 0
    for row, length in enumerate(words.sum(1).tolist()):
        gold = entities(gold_tags[start : start + length])
        guessed = entities(predicted_tags[start : start + length])
        start += length
        for spans, column in ((gold & guessed, 0), (guessed, 1), (gold, 2)):
            for _, _, kind in spans:
                counts[row, kind, column] += 1
    return {
        "words": words.sum(1),
        "words_correct": ((predicted == batch["labels"]) & words).sum(1),
        "entity_counts": counts.to(words.device),
    }


def compute_metrics(gathered):
    # per entity type
    correct, predicted, gold = gathered["entity_counts"].sum(0).double().unbind(-1)
    seen = (predicted + gold) > 0
    per_type_f1 = 2 * correct[seen] / (predicted + gold)[seen]
    return {
        "accuracy": (gathered["words_correct"].sum() / gathered["words"].sum()).item(),
        "precision": (correct.sum() / predicted.sum().clamp(min=1)).item(),
        "recall": (correct.sum() / gold.sum().clamp(min=1)).item(),
        # over all entities
        "f1": (2 * correct.sum() / (predicted.sum() + gold.sum()).clamp(min=1)).item(),
        "macro_f1": per_type_f1.mean().item() if seen.any() else 0.0,
    }  # mean over the entity types


def words_and_tags(tokenizer, batch, tag_ids, k):
    """Per sentence: its words (sub-tokens joined back) and the tag id at each word's first
    sub-token."""
    special = set(tokenizer.all_special_ids)
    sentences = []
    for ids, starts, tags in zip(
        batch["input_ids"][:k].tolist(), batch["word_starts"][:k], tag_ids[:k]
    ):
        positions = starts.nonzero().flatten().tolist()
        ends = positions[1:] + [len(ids)]
        words = [
            tokenizer.decode([t for t in ids[s:e] if t not in special]).strip()
            for s, e in zip(positions, ends)
        ]
        sentences.append((words, tags[positions].tolist()))
    return sentences


def format_samples(model, tokenizer, batch, outputs, k):
    names = model.config.id2label

    def show(words, tags):  # "Anna/B-PER Lopez/I-PER flew to Paris/B-LOC ."
        return " ".join(
            word if tag == 0 else f"{word}/{names[tag]}" for word, tag in zip(words, tags)
        )

    predicted = words_and_tags(tokenizer, batch, outputs.logits.argmax(-1), k)
    gold = words_and_tags(tokenizer, batch, batch["labels"], k)
    return [f"prediction: {show(*p)}\n  gold:       {show(*g)}" for p, g in zip(predicted, gold)]


def predictions(model, tokenizer, batch, outputs):
    predicted = outputs.logits.argmax(-1)
    return [
        {"tags": [model.config.id2label[tag] for tag in tags[starts.bool()].tolist()]}
        for tags, starts in zip(predicted, batch["word_starts"])
    ]
