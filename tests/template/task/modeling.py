"""USER EDITS: the model. The default is text classification: an encoder and a linear head.

What train.py and predict.py read from this file (nothing else):
  * `Model` (required): a transformers PreTrainedModel, so that it saves and loads with
    save_pretrained(dir) / from_pretrained(dir) like BertModel: a trained checkpoint loads with
    `Model.from_pretrained("model/best")` and no train.py. `Model.forward(**batch)` takes the keys
    the dataset's collate function yields and returns a ModelOutput whose `.loss` is a scalar
    tensor.
  * `build_model(model_name_or_path, train_set)` (required) returns the model to train. `train_set`
    is what dataset.generate_dataset() built from --train_file, so the data can size the model
    (here: the label names become config.id2label, the learnt vocabulary sizes the embeddings).
  * The optional hooks that look at a batch's outputs all take `(model, tokenizer, batch, outputs)`:
    `model` is the unwrapped model in eval mode, without gradients (it may call model.generate()),
    `tokenizer` what dataset.load_tokenizer() gave (None without it).
  * `metric_inputs(model, tokenizer, batch, outputs)` and `compute_metrics(gathered)` (optional,
    both or neither): the first picks per-example tensors (first dimension = batch size, the same
    other dimensions for every batch: scores or counts, not token ids of varying length) that
    train.py gathers from all processes over the validation set; it runs on every process, on its
    share of the set. The second turns them into {"name": float}, shown in the VALID bar and
    stored in log.json next to the validation loss. A metric of generated text: generate and score
    each example in metric_inputs, add the scores up in compute_metrics (see examples/seq2seq).
    Without them validation reports the loss only. --metric_for_best picks one of them to decide
    best/: lower is better for names like loss, error, mse, mae, rmse, perplexity, higher for the
    others (--greater_is_better overrides).
  * `loss_items(batch)` (optional): per example (a tensor, first dimension = batch size), the items
    `.loss` is a mean over, for a loss whose number of items varies between batches (tokens with a
    label: see examples/). train.py then weighs every item of an optimizer step alike, however the
    step is split into --accumulation batches and processes, and logs means over items. Without
    it each batch weighs the same: right for this file's loss, a mean over examples.
  * `format_samples(model, tokenizer, batch, outputs, k)` (optional, for --sample_every) shows k
    examples of a training batch as text (input / prediction / gold). It runs on the main process
    only, with the RNG state restored afterwards, so it may call model.generate() (on the unwrapped
    model).
  * `predictions(model, tokenizer, batch, outputs)` (optional, for predict.py) turns a batch into
    one JSON-able dict per example; without it predict.py writes the raw outputs.
    `merge_predictions(predictions)` (optional): the dicts of the examples of one input row (a
    batch with "row": see dataset.py) as one dict, its line; without it they are listed.
    `outputs.embeddings` (optional) is what predict.py --embeddings writes.

To change the task, change the head and the loss in forward(), and the functions below it.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from utils import has_weights


class ModelConfig(PretrainedConfig):
    model_type = "template-classifier"

    def __init__(self, encoder=None, classifier_dropout=0.1, **kwargs):
        # the backbone's own config, as a dict (config.json of BERT etc.)
        self.encoder = encoder or {}
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


# so Auto* classes read a checkpoint's config.json
AutoConfig.register(ModelConfig.model_type, ModelConfig)


@dataclass
class ClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # the pooled vector the head reads (predict.py --embeddings)
    embeddings: torch.Tensor | None = None


class Model(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config)
        # unused: the head pools itself (an unused layer would make DDP fail)
        self.encoder.pooler = None
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, labels=None, **inputs):
        # inputs: what the tokenizer gave (input_ids, attention_mask, ...)
        pooled = self.encoder(**inputs).last_hidden_state[:, 0]  # the [CLS] position
        logits = self.head(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits, embeddings=pooled)


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (assets/tiny-bert) gives a randomly initialised encoder
    sized to the vocabulary dataset.py learnt; a hub id or a directory with weights gives that
    pretrained encoder under a new head."""
    labels = train_set.labels
    # trust_remote_code=False here and below: a folder that asks to run its own code is refused.
    encoder_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False)
    pretrained = has_weights(model_name_or_path)
    if not pretrained:
        encoder_config.vocab_size = len(train_set.tokenizer)
        encoder_config.pad_token_id = train_set.tokenizer.pad_token_id
    config = ModelConfig(
        encoder=encoder_config.to_dict(),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = Model(config)
    if pretrained:
        model.encoder = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=False)
        model.encoder.pooler = None  # as in Model.__init__
    return model


def metric_inputs(model, tokenizer, batch, outputs):
    return {"predictions": outputs.logits.argmax(-1), "labels": batch["labels"]}


def compute_metrics(gathered):
    predictions, labels = gathered["predictions"], gathered["labels"]
    f1 = [
        2
        * ((predictions == c) & (labels == c)).sum()
        / ((predictions == c).sum() + (labels == c).sum())
        for c in torch.cat([predictions, labels]).unique()
    ]  # per class: 2 TP / (predicted + gold)
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "macro_f1": torch.stack(f1).mean().item(),
    }  # over the classes seen, like sklearn's f1_score


def format_samples(model, tokenizer, batch, outputs, k):
    names = model.config.id2label
    predicted = outputs.logits[:k].argmax(-1).tolist()
    return [
        f"input: {tokenizer.decode(ids, skip_special_tokens=True)}\n"
        f"  prediction: {names[p]}  gold: {names[g]}"
        for ids, p, g in zip(
            batch["input_ids"][:k].tolist(), predicted, batch["labels"][:k].tolist()
        )
    ]


def predictions(model, tokenizer, batch, outputs):
    scores, ids = outputs.logits.float().softmax(-1).max(-1)
    return [
        {"label": model.config.id2label[i], "score": round(s, 6)}
        for i, s in zip(ids.tolist(), scores.tolist())
    ]
