"""Writes this example's data and its tiny GPT-2: data/{train,valid}.txt (one text per line) and
tiny-gpt2/ (config.json, plus a byte-level BPE tokenizer trained on data/train.txt).

The lines come from a few templates with something to learn: the days and months in order,
counting, sums in words, and little stories whose second half follows from the first ("ran to the
river and drank some water"). Deterministic: run it again and every file is byte-identical.

    python examples/causal_lm/make_data.py
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
ANIMALS = ["fox", "cat", "dog", "rabbit", "horse", "goat", "duck", "mouse"]
ADJECTIVES = ["little", "old", "young", "brown", "white", "hungry", "tired", "happy"]
MOVES = ["ran", "walked", "went", "hurried"]
# Where the animal goes decides what it does there.
PLACES = {
    "river": "drank some water",
    "forest": "hid behind a tree",
    "farm": "ate some grain",
    "hill": "looked at the sky",
    "house": "slept by the fire",
    "garden": "played in the grass",
}
EOS, PAD = "<|endoftext|>", "<pad>"


def line(rng):
    kind = rng.random()
    if kind < 0.2:
        names = rng.choice([DAYS, MONTHS])
        i = rng.randrange(len(names))
        return f"after {names[i]} comes {names[(i + 1) % len(names)]}"
    if kind < 0.4:
        start = rng.randrange(len(NUMBERS) - 6)
        return "count " + " ".join(NUMBERS[start : start + rng.randint(3, 6)])
    if kind < 0.55:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}"
    place = rng.choice(sorted(PLACES))
    return (
        f"the {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} {rng.choice(MOVES)} to the {place} "
        f"and {PLACES[place]}"
    )


def main():
    rng = random.Random(1234)
    (HERE / "data").mkdir(exist_ok=True)
    for name, size in [("train", 800), ("valid", 100)]:
        (HERE / "data" / f"{name}.txt").write_text("\n".join(line(rng) for _ in range(size)) + "\n")

    # GPT-2's tokenizer design (bytes, so no text is unknown), with a vocabulary sized to this data.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(HERE / "data" / "train.txt")], trainer)
    folder = HERE / "tiny-gpt2"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=128,
    ).save_pretrained(folder)
    config = {
        "model_type": "gpt2",
        "vocab_size": tokenizer.get_vocab_size(),
        "n_positions": 128,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 256,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "bos_token_id": tokenizer.token_to_id(EOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
