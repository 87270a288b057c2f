"""Writes the shipped sample task: short product reviews labelled positive / negative / neutral.

The sentences are built from templates so the task is learnable by a tiny model in a few epochs,
but not from single words alone: "not" flips the sentiment of the adjective after it, and a
"but" clause decides the label of a mixed review. Deterministic: run it again and the files are
byte-identical.

    python data/make_sample_data.py      # rewrites data/{train,valid}.jsonl
"""

import json
import random
from pathlib import Path

SUBJECTS = [
    "the movie",
    "the food",
    "the hotel",
    "the book",
    "the service",
    "the phone",
    "the camera",
    "the game",
    "the room",
    "the staff",
    "the coffee",
    "the laptop",
    "the album",
    "the show",
    "the shoes",
    "the car",
    "the app",
    "the pizza",
    "the concert",
    "the course",
]
VERBS = ["was", "is", "seemed", "felt", "looked", "turned out"]
POSITIVE = [
    "great",
    "excellent",
    "wonderful",
    "amazing",
    "good",
    "fantastic",
    "lovely",
    "superb",
    "delightful",
    "brilliant",
    "pleasant",
    "perfect",
]
NEGATIVE = [
    "terrible",
    "awful",
    "bad",
    "horrible",
    "poor",
    "disappointing",
    "boring",
    "dreadful",
    "broken",
    "useless",
    "mediocre",
    "annoying",
]
NEUTRAL = [
    "arrived on tuesday",
    "came in a box",
    "is sold in stores",
    "has a blue cover",
    "was made last year",
    "costs twenty dollars",
    "is available online",
    "was delivered today",
    "comes in three colors",
    "opened this week",
]
INTENSIFIERS = ["", "", "really", "very", "quite", "truly", "rather", "so"]
OPENERS = ["", "", "", "honestly", "overall", "i think", "in my opinion", "well"]


def clause(rng):
    """One sentiment clause and its polarity (+1 / -1)."""
    polarity = rng.choice([1, -1])
    adjective = rng.choice(POSITIVE if polarity > 0 else NEGATIVE)
    negated = rng.random() < 0.3
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)] + (["not"] if negated else [])
    words += [rng.choice(INTENSIFIERS), adjective]
    return " ".join(w for w in words if w), -polarity if negated else polarity


def example(rng):
    kind = rng.random()
    if kind < 0.3:
        text, label = f"{rng.choice(SUBJECTS)} {rng.choice(NEUTRAL)}", "neutral"
    elif kind < 0.75:
        text, polarity = clause(rng)
        label = "positive" if polarity > 0 else "negative"
    else:  # a mixed review: the clause after "but" wins
        first, _ = clause(rng)
        second, polarity = clause(rng)
        text, label = f"{first} but {second}", "positive" if polarity > 0 else "negative"
    opener = rng.choice(OPENERS)
    return {"text": f"{opener} {text}".strip(), "label": label}


def main():
    root = Path(__file__).resolve().parent.parent
    rng = random.Random(1234)
    for name, size in [("train", 3000), ("valid", 400)]:
        with open(root / "data" / f"{name}.jsonl", "w") as f:
            for _ in range(size):
                f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
