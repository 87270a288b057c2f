"""Writes this example's data and its tiny T5: data/{train,valid}.jsonl (one pair a line:
{"source": "4213", "target": "four thousand two hundred thirteen"}) and tiny-t5/ (config.json, plus
a byte-level BPE tokenizer trained on the training sources and targets).

Numbers from 0 to 9999 written out in English words: the model has to learn what a digit means
from its place ("4" is "four thousand", "forty" or "four"), and the teens ("13" is "thirteen",
not "ten three"). The training file has every number below 100 among its 2,000; the validation
file has 200 others, from 100 to 9999. Deterministic: run it again and
every file is byte-identical.

    python examples/seq2seq/make_data.py
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
ONES = [
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
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
PAD, EOS = "<pad>", "</s>"  # T5's: the pad token (id 0) is also the decoder's start token
TRAIN, VALID = 2000, 200


def words(number):
    """4213 -> "four thousand two hundred thirteen" (American style: no "and")."""
    if number < 20:
        return ONES[number]
    if number < 100:
        return TENS[number // 10] + ("" if number % 10 == 0 else " " + ONES[number % 10])
    for size, name in [(1000, "thousand"), (100, "hundred")]:
        if number >= size:
            rest = number % size
            return f"{words(number // size)} {name}" + (f" {words(rest)}" if rest else "")


def main():
    # Every number below 100 is a training one (drawn from 0-9999 alike, they would be 1 in 100, and
    # "77" came out as "seven hundred seventy seven"); no number is in both files.
    rng = random.Random(1234)
    numbers = rng.sample(range(100, 10_000), TRAIN + VALID - 100)
    train = numbers[: TRAIN - 100] + list(range(100))
    rng.shuffle(train)
    (HERE / "data").mkdir(exist_ok=True)
    pairs = {}
    for name, chosen in [("train", train), ("valid", numbers[TRAIN - 100 :])]:
        pairs[name] = [{"source": str(n), "target": words(n)} for n in chosen]
        (HERE / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in pairs[name])
        )

    # Bytes (no text is unknown), each digit a token of its own (so "4213" is 4 2 1 3, not 42 13),
    # and every text ends with </s>, as T5's tokenizers do: the model learns where to stop.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[PAD, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text for p in pairs["train"] for text in p.values()], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, tokenizer.token_to_id(EOS))],
    )
    folder = HERE / "tiny-t5"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, model_max_length=128
    ).save_pretrained(folder)
    # No dropout: it held the loss on a plateau for twice as many epochs, and with a rule to learn
    # (not noise) the validation loss stays near the training loss without it.
    config = {
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": tokenizer.get_vocab_size(),
        "d_model": 64,
        "d_kv": 16,
        "num_heads": 4,
        "d_ff": 256,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "feed_forward_proj": "relu",
        "dropout_rate": 0.0,
        "relative_attention_num_buckets": 32,
        "pad_token_id": tokenizer.token_to_id(PAD),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "decoder_start_token_id": tokenizer.token_to_id(PAD),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
