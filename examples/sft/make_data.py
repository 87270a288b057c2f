"""Writes this example's data and its tiny chat model: data/{train,valid}.jsonl (one {"prompt",
"response"} pair a line) and tiny-gpt2-chat/ (config.json, plus a byte-level BPE tokenizer trained
on the training pairs, with the special tokens of a chat and a chat template that uses them).

The instructions come from a few templates, each with a rule to learn: the next or previous day or
month, a sum in words, the letters of a word, and a short list of words reversed. Deterministic:
run it again and every file is byte-identical.

    python examples/sft/make_data.py
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
WORDS = [
    "cat",
    "dog",
    "fox",
    "sun",
    "map",
    "cup",
    "red",
    "box",
    "hat",
    "pen",
    "bird",
    "fish",
    "tree",
    "moon",
    "star",
    "milk",
    "rain",
    "door",
    "book",
    "lamp",
    "frog",
    "cake",
    "ship",
    "rock",
    "wolf",
    "bell",
]
PAD, USER, ASSISTANT, SYSTEM, END = "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
# Each message is <|role|>content<|end|>; with add_generation_prompt the prompt ends on
# <|assistant|>, so that what the model writes after it is the reply, up to its own <|end|> (the eos
# token: generate() stops there).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def pair(rng):
    kind = rng.randrange(5)
    if kind == 0:
        names = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(names))
        return f"what comes after {names[i]}?", names[(i + 1) % len(names)]
    if kind == 1:
        names = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(names))
        return f"what comes before {names[i]}?", names[i - 1]
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"add {NUMBERS[a]} and {NUMBERS[b]}", NUMBERS[a + b]
    if kind == 3:
        word = rng.choice(WORDS)
        return f"spell {word}", " ".join(word)
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"reverse the words: {' '.join(words)}", " ".join(reversed(words))


def main():
    rng = random.Random(1234)
    (HERE / "data").mkdir(exist_ok=True)
    for name, size in [("train", 3000), ("valid", 200)]:
        rows = [dict(zip(("prompt", "response"), pair(rng))) for _ in range(size)]
        (HERE / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows)
        )

    # GPT-2's tokenizer design (bytes, so no text is unknown), with a vocabulary sized to this data;
    # the chat tokens are special: never split, and never merged with the text around them.
    texts = [
        text
        for line in (HERE / "data" / "train.jsonl").read_text().splitlines()
        for text in json.loads(line).values()
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, END, USER, ASSISTANT, SYSTEM],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    folder = HERE / "tiny-gpt2-chat"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=128,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)
    config = {
        "model_type": "gpt2",
        "vocab_size": tokenizer.get_vocab_size(),
        "n_positions": 128,
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": 512,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": tokenizer.token_to_id(END),
        "eos_token_id": tokenizer.token_to_id(END),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
