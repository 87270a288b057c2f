"""USER EDITS: the model. The default is text classification: an encoder and a linear head.

What train.py expects of this file:
  * `build_model(model_name_or_path, train_set)` returns the model to train. `train_set` is what
    dataset.generate_dataset() built from --train_file, so the data can size the model (here:
    the label names become config.id2label).
  * `Model.forward(**batch)` takes the keys the dataset's collate function yields and returns a
    ModelOutput whose `.loss` is a scalar tensor.
  * `Model` saves and loads with save_pretrained(dir) / from_pretrained(dir) like BertModel, so a
    trained checkpoint loads with `Model.from_pretrained("model/best")` and no train.py.
  * `metric_inputs(batch, outputs)` picks per-example tensors (first dimension = batch size) that
    train.py gathers from all processes over the validation set; `compute_metrics(gathered)` turns
    them into {"name": float}, stored in log.json next to the validation loss.

To change the task, change the head and the loss in forward(), and the two metric functions.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class ModelConfig(PretrainedConfig):
    model_type = "template-classifier"

    def __init__(self, encoder=None, classifier_dropout=0.1, **kwargs):
        self.encoder = encoder or {}  # the backbone's own config, as a dict (config.json of BERT etc.)
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


@dataclass
class ClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Model(PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config)
        self.encoder.pooler = None  # unused: the head pools itself (an unused layer would make DDP fail)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, labels=None, **inputs):  # inputs: what the tokenizer gave (input_ids, attention_mask, ...)
        hidden = self.encoder(**inputs).last_hidden_state
        logits = self.head(self.dropout(hidden[:, 0]))  # the [CLS] position
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (assets/tiny-bert) gives a randomly initialised encoder;
    a hub id or a directory with weights gives that pretrained encoder under a new head."""
    labels = train_set.labels
    encoder_config = AutoConfig.from_pretrained(model_name_or_path)
    config = ModelConfig(encoder=encoder_config.to_dict(), id2label=dict(enumerate(labels)),
                         label2id={label: i for i, label in enumerate(labels)})
    model = Model(config)
    local = Path(model_name_or_path)
    has_weights = not local.is_dir() or any(local.glob("*.safetensors")) or any(local.glob("*.bin"))
    if has_weights:
        model.encoder = AutoModel.from_pretrained(model_name_or_path)
    return model


def metric_inputs(batch, outputs):
    return {"predictions": outputs.logits.argmax(-1), "labels": batch["labels"]}


def compute_metrics(gathered):
    return {"accuracy": (gathered["predictions"] == gathered["labels"]).float().mean().item()}
