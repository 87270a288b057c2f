"""USER EDITS: the model. Example: extractive question answering (SQuAD): a BERT with a head that
scores each token as the answer's start and as its end, trained from scratch with
examples/question_answering/tiny-bert-qa or on top of a pretrained encoder (bert-base-uncased).

Copy it over the repository's modeling.py, with dataset.py beside it:

    cp examples/question_answering/{modeling,dataset}.py .

What train.py expects of this file (as for the default task):
  * `build_model(model_name_or_path, train_set)` returns the model.
  * `Model.forward(**batch)` returns a ModelOutput with `.loss`: the mean of the cross-entropies of
    the start and of the end token (0, [CLS], for a window that does not hold the answer).
  * `Model.from_pretrained(dir)` loads a trained checkpoint without train.py.
  * `metric_inputs(model, tokenizer, batch, outputs)` / `compute_metrics(gathered)`: SQuAD's exact
    match and F1 per question (0-100), from the best-scoring window of each question.
  * `format_samples(...)` shows question, predicted and gold answer of a few windows;
    `predictions(model, tokenizer, batch, outputs)` gives each window's answer and score, and
    `merge_predictions(predictions)` keeps the best window's: predict.py writes one line per
    question.

A question's answer is read from each of its windows (dataset.py): the best span of the window's
context (start <= end, at most MAX_ANSWER_TOKENS long, scored by start logit + end logit), mapped
back to characters of the context through the "offsets" the batch carries beside its tensors.
The window whose span scores highest answers the question.
"""

import collections
import re
import string

import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering

from utils import has_weights

# The hub's own ...ForQuestionAnswering classes already are what train.py needs: forward() takes
# input_ids, token_type_ids, attention_mask, start_positions and end_positions and returns the
# loss, and from_pretrained() builds the class a checkpoint's config.json names (here a
# BertForQuestionAnswering). Its forward() names none of the values that ride along in the batch
# (offsets, context, ...), so train.py keeps them from it.
Model = AutoModelForQuestionAnswering
# The longest answer read, in tokens (run_qa.py's max_answer_length). This data's answers take 4 at
# most; SQuAD's are longer: run_qa.py reads up to 30.
MAX_ANSWER_TOKENS = 10


def build_model(model_name_or_path, train_set):
    """A directory with only a config.json (tiny-bert-qa) gives a randomly initialised model; a hub
    id or a directory with weights gives that pretrained encoder under a new start/end head."""
    # trust_remote_code=False: a folder that asks to run its own code is refused
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False)
    if has_weights(model_name_or_path):
        model = Model.from_pretrained(model_name_or_path, trust_remote_code=False)
    else:
        model = Model.from_config(config, trust_remote_code=False)
    vocabulary = len(train_set.tokenizer)
    if vocabulary > model.get_input_embeddings().num_embeddings:  # a tokenizer with added tokens
        model.resize_token_embeddings(vocabulary)
    return model


# ---------------------------------------------------------------- SQuAD v1.1's official scoring


PUNCTUATION = set(string.punctuation)


def normalize_answer(text):
    """Lower case, no punctuation, no articles (a, an, the), single spaces: evaluate-v1.1.py's."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match_score(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction, gold):
    """F1 of the normalised words (a bag: a word twice counts twice)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(score, prediction, golds):
    """SQuAD's score of a prediction: its best against any of the gold answers (0 without any)."""
    return max((score(prediction, gold) for gold in golds), default=0.0)


# ---------------------------------------------------------------- reading the answer of a window


def best_spans(batch, outputs):
    """Per window: the first and last token of its best span (inside the context, start <= end, at
    most MAX_ANSWER_TOKENS long) and its score, start logit + end logit (-inf: no context token)."""
    start, end = outputs.start_logits.float(), outputs.end_logits.float()
    width = start.shape[1]
    context = torch.tensor(
        [[span is not None for span in offsets] + [False] * (width - len(offsets))
         for offsets in batch["offsets"]],
        device=start.device,
    )  # fmt: skip
    positions = torch.arange(width, device=start.device)
    length = positions.unsqueeze(0) - positions.unsqueeze(1)  # [start, end]: end - start
    allowed = (length >= 0) & (length < MAX_ANSWER_TOKENS)
    allowed = allowed & context.unsqueeze(2) & context.unsqueeze(1)  # [window, start, end]
    scores = (start.unsqueeze(2) + end.unsqueeze(1)).masked_fill(~allowed, float("-inf"))
    score, flat = scores.flatten(1).max(1)
    return flat // width, flat % width, score


def span_texts(batch, starts, ends):
    """The text of each window's span, cut from its context by the tokens' character offsets."""
    texts = []
    for offsets, context, s, e in zip(batch["offsets"], batch["context"], starts, ends):
        inside = offsets[s] is not None and offsets[e] is not None
        texts.append(context[offsets[s][0] : offsets[e][1]] if inside else "")
    return texts


def read_answers(batch, outputs):
    """Each window's answer text and its score (a float)."""
    starts, ends, scores = best_spans(batch, outputs)
    return span_texts(batch, starts.tolist(), ends.tolist()), scores


# ---------------------------------------------------------------- the hooks


def metric_inputs(model, tokenizer, batch, outputs):
    # Per window, fixed-size numbers: which question it belongs to, its span's score and how good
    # that span is. A question's windows may sit in different batches, even different processes;
    # compute_metrics() gets them all and picks per question.
    texts, scores = read_answers(batch, outputs)
    device = scores.device
    pairs = list(zip(texts, batch["answers"]))

    def per_window(score):
        return torch.tensor([best_over_golds(score, *pair) for pair in pairs], device=device)

    return {
        "row": torch.tensor(batch["row"], device=device),
        "score": scores,
        "exact": per_window(exact_match_score),
        "f1": per_window(f1_score),
    }


def compute_metrics(gathered):
    # Per question, the window with the highest score; a tie (rare) takes the lower F1, so that the
    # figures never depend on the order the windows arrive in.
    best = {}
    columns = (gathered[key].tolist() for key in ("row", "score", "f1", "exact"))
    for row, score, f1, exact in zip(*columns):
        if row not in best or (score, -f1) > (best[row][0], -best[row][1]):
            best[row] = (score, f1, exact)
    questions = max(len(best), 1)
    return {
        "exact_match": 100 * sum(exact for _, _, exact in best.values()) / questions,
        "f1": 100 * sum(f1 for _, f1, _ in best.values()) / questions,
    }  # SQuAD's scale: 0-100


def format_samples(model, tokenizer, batch, outputs, k):
    texts, scores = read_answers(batch, outputs)
    null = (outputs.start_logits[:, 0] + outputs.end_logits[:, 0]).tolist()  # [CLS]: not here
    samples = []
    for i in range(min(k, len(texts))):
        here = "start_positions" in batch and batch["start_positions"][i] > 0
        where = "in this window" if here else "not in this window: [CLS] is right"
        samples.append(
            f"question: {batch['question'][i]}\n"
            f"  prediction: {texts[i]!r} (span {scores[i]:.1f}, [CLS] {null[i]:.1f})\n"
            f"  gold: {batch['answers'][i][0]!r} ({where})"
        )
    return samples


def predictions(model, tokenizer, batch, outputs):
    texts, scores = read_answers(batch, outputs)
    return [
        {"answer": text, "score": round(score, 4) if score > float("-inf") else None}
        for text, score in zip(texts, scores.tolist())
    ]


def merge_predictions(predictions):
    """predict.py: the windows of one question (consecutive, in order) -> one line: the answer of
    the best-scoring window, as compute_metrics() picks it."""
    return max(predictions, key=lambda p: float("-inf") if p["score"] is None else p["score"])
