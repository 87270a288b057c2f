"""Writes this example's data and its tiny BERT: data/{train,valid}.jsonl (one sentence a line:
{"tokens": [...words], "tags": [...BIO tags]}) and tiny-bert-ner/ (config.json, plus a small
WordPiece tokenizer trained on the training words, so that rarer words split into sub-tokens).

Named entities of three types (PER, LOC, ORG) in template sentences. Some names are people in
one sentence and places in another ("Jordan", "Washington"), so the context decides, and "apple"
is an ORG only as "Apple". Deterministic: run it again and every file is byte-identical.

    python examples/token_classification/make_data.py
"""

import json
import random
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
ENTITIES = {
    "PER": [
        "Anna",
        "Anna Lopez",
        "Jordan",
        "Jordan Lee",
        "Washington",
        "George Washington",
        "Maria",
        "Li Wei",
        "Tom Baker",
        "Priya Natarajan",
        "Olumide",
        "Sven Karlsson",
        "Yuki Tanaka",
        "Carlos",
    ],
    "LOC": [
        "Paris",
        "New York",
        "Jordan",
        "Washington",
        "Berlin",
        "Cape Town",
        "Lake Tahoe",
        "Lima",
        "Osaka",
        "the Alps",
        "Nairobi",
        "Oslo",
    ],
    "ORG": [
        "Acme Corp",
        "Globex",
        "Initech",
        "Umbrella Labs",
        "the United Nations",
        "Apple",
        "Red Cross",
        "Stark Industries",
        "Hooli",
        "Vandelay Industries",
    ],
}
TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} flew to {LOC} on Monday .",
    "{ORG} opened an office in {LOC} .",
    "{PER} met {PER} at the {ORG} headquarters .",
    "yesterday {PER} said that {ORG} will hire more people .",
    "the road from {LOC} to {LOC} was closed .",
    "the weather in {LOC} was cold .",
    "{PER} visited {LOC} with {PER} .",
    "{PER} bought an apple in {LOC} .",
    "{ORG} and {ORG} signed a deal .",
    "nobody was at home today .",
    "she ate an apple and went to sleep .",
]


def sentence(rng):
    tokens, tags = [], []
    for part in rng.choice(TEMPLATES).split():
        if part.startswith("{"):
            kind = part.strip("{}")
            words = rng.choice(ENTITIES[kind]).split()
            if words[0] == "the":  # "the United Nations": the article is not part of the name
                tokens.append(words.pop(0))
                tags.append("O")
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(part)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main():
    rng = random.Random(1234)
    (HERE / "data").mkdir(exist_ok=True)
    for name, size in [("train", 600), ("valid", 150)]:
        with open(HERE / "data" / f"{name}.jsonl", "w") as f:
            for _ in range(size):
                f.write(json.dumps(sentence(rng)) + "\n")

    # BERT's tokenizer design (cased), with a vocabulary small enough that names split into pieces.
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    words = [" ".join(json.loads(line)["tokens"]) for line in open(HERE / "data" / "train.jsonl")]
    tokenizer.train_from_iterator(words, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    folder = HERE / "tiny-bert-ner"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    ).save_pretrained(folder)
    config = {
        "model_type": "bert",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "type_vocab_size": 2,
        "pad_token_id": tokenizer.token_to_id("[PAD]"),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
