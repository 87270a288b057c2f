"""Writes this example's data and its tiny BERT: data/{train,valid}.jsonl (SQuAD's layout, one
question a line: {"id", "context", "question", "answers": {"text": [...], "answer_start": [...]}})
and tiny-bert-qa/ (config.json, plus a small WordPiece tokenizer whose names split into pieces).

Each context lists 8 to 16 made-up facts, each of another of 16 relations, in a random order ("The
capital of Morvia is Dreby.", "Bruno was born in 1726.", "Olga lives on Calton Street."); 2
questions ask about 2 of them, drawn from the whole context. A question's relation comes once in
its context, so the question's words find the sentence; but some relations give answers that look
alike (a capital and a street are made of the same name pieces, a birth year and the year a bridge
opened are both years), so the kind of answer alone does not. A tiny model from scratch learns this
in a minute; with several facts of one relation per context, told apart only by their subjects, it
stayed near F1 40 after 10 epochs in our trials. At --max_len 56 (train.yaml) every context takes
2 to 4 windows, and about half the answers lie beyond the first. Some questions have several gold
answers, as in SQuAD ("1872" and "in 1872"). Deterministic: run it again and every file is
byte-identical.

    python examples/question_answering/make_data.py
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
TRAIN_CONTEXTS, VALID_CONTEXTS, QUESTIONS_PER_CONTEXT = 1250, 125, 2
FACTS = range(8, 17)  # facts per context, each of another relation

# Subjects are whole words of the vocabulary. Answers are often made of pieces: "Velm" is
# "vel ##m", 1872 is "18 ##72", so an answer often spans several tokens.
PEOPLE = """Ada Bruno Clara Dmitri Elena Felix Greta Hugo Ines Jonas Karl Lena Marta Nils Olga
    Pablo Rosa Sven Tara Umar Vera Walter Yara Zoe Anton Bianca Cyril Dora Emil Frida""".split()
COUNTRIES = """Norland Velmark Karstan Ostoria Belgard Marovia Talheim Dunmore Serbane Lomaria
    Ardenia Fennmark Galvia Havrun Iskara Jorvik Keldor Lunmark Morvia Pelagon""".split()
COMPANIES = "Acmecorp Zentech Orbisoft Lumware Novacorp Voxel Quillon Globex Initech".split()
ISLANDS = "Kelo Marra Tuvo Pelle Anka Sorra Vissa Ulma Ebbe Rimo Oska Lindo Fara Gisla".split()
BOOKS = "Moonfall Ironwood Saltmarsh Emberlight Stillwater Frostline Ashgrove Tidecall".split()
RIVERS = "Elbra Sorn Tavel Ruhm Ister Lenne Odra Marn Vask Dyle".split()
MOUNTAINS = "Karbo Teller Hossa Vinna Orlo Brakk Sella Tormo".split()
BRIDGES = "Stone Iron Harbour Market Castle Mill Abbey Tower".split()
TEAMS = "Falcons Wolves Comets Pirates Rangers Titans Vikings Hornets Otters Bears".split()
SPORTS = "football tennis hockey rugby cricket basketball volleyball baseball handball".split()
MONTHS = "January February March April May June July August September October November".split()
COLOURS = "red green blue yellow white black orange purple grey".split()
NUMBERS = "two three four five six seven eight nine".split()
INSTRUMENTS = "piano violin guitar drums flute cello trumpet harp".split()
TOPICS = "dragons pirates robots ghosts horses trains islands kings wolves".split()
JOBS = "baker pilot teacher doctor farmer painter lawyer sailor nurse".split()
# Made-up names out of pieces: a first piece and an ending.
PLACE = (["Bra", "Cal", "Dre", "Elm", "Far", "Gor", "Hal", "Kin", "Lis", "Mon", "Pra", "Ros"],
         ["m", "ford", "by", "ton", "wick", "burg", "dal", "sk"])  # fmt: skip
SURNAME = (["Brenn", "Castel", "Dorr", "Eck", "Fal", "Grim", "Holt", "Ivar"], ["", "son", "er"])
TONGUE = (["Vel", "Kar", "Ost", "Mar", "Tal", "Dun", "Lom", "Fen"], ["ish", "ese", "ic", "an"])


def pieces(parts):
    return lambda rng: "".join(rng.choice(part) for part in parts)


def one_of(words):
    return lambda rng: rng.choice(words)


def person(rng):
    return f"{rng.choice(PEOPLE)} {pieces(SURNAME)(rng)}"


def number(low, high, unit=""):
    return lambda rng: f"{rng.randrange(low, high)}{unit}"


# A relation: the sentence, its questions, the gold answers ("{o}": the object as the sentence
# has it; several, as SQuAD gives for some questions), the subject and the object.
RELATIONS = [
    ("The capital of {s} is {o}.", ["What is the capital of {s}?",
     "Which city is the capital of {s}?"], ["{o}"], one_of(COUNTRIES), pieces(PLACE)),
    ("{s} was born in {o}.", ["When was {s} born?", "In which year was {s} born?"],
     ["{o}", "in {o}"], one_of(PEOPLE), number(1700, 2000)),
    ("{s} lives on {o}.", ["Where does {s} live?", "On which street does {s} live?"],
     ["{o}", "on {o}"], one_of(PEOPLE), lambda rng: f"{pieces(PLACE)(rng)} Street"),
    ("{s} works as a {o}.", ["What is the job of {s}?", "What does {s} work as?"],
     ["{o}", "a {o}"], one_of(PEOPLE), one_of(JOBS)),
    ("{s} has {o} children.", ["How many children does {s} have?"], ["{o}", "{o} children"],
     one_of(PEOPLE), one_of(NUMBERS)),
    ("{s} plays the {o}.", ["Which instrument does {s} play?", "What does {s} play?"],
     ["{o}", "the {o}"], one_of(PEOPLE), one_of(INSTRUMENTS)),
    ("{s} was founded by {o}.", ["Who founded {s}?", "Who was {s} founded by?"], ["{o}"],
     one_of(COMPANIES), person),
    ("The book {s} is about {o}.", ["What is the book {s} about?",
     "What is {s} about?"], ["{o}"], one_of(BOOKS), one_of(TOPICS)),
    ("The island of {s} has {o} people.", ["How many people live on {s}?",
     "What is the population of {s}?"], ["{o}", "{o} people"], one_of(ISLANDS),
     number(2, 990, " thousand")),
    ("The river {s} flows into the {o}.", ["Which sea does the river {s} flow into?",
     "Where does the river {s} flow?"], ["{o}", "the {o}"], one_of(RIVERS),
     lambda rng: f"{pieces(PLACE)(rng)} Sea"),
    ("Mount {s} is {o} high.", ["How high is Mount {s}?"], ["{o}"], one_of(MOUNTAINS),
     number(1000, 9000, " metres")),
    ("People in {s} speak {o}.", ["What language do people in {s} speak?",
     "Which language is spoken in {s}?"], ["{o}"], one_of(COUNTRIES), pieces(TONGUE)),
    ("The {s} team plays {o}.", ["What sport do the {s} play?",
     "Which sport does the {s} team play?"], ["{o}"], one_of(TEAMS), one_of(SPORTS)),
    ("The {s} bridge opened in {o}.", ["When did the {s} bridge open?",
     "In which year did the {s} bridge open?"], ["{o}", "in {o}"], one_of(BRIDGES),
     number(1800, 2020)),
    ("The {s} festival is held in {o}.", ["When is the {s} festival held?",
     "In which month is the {s} festival?"], ["{o}", "in {o}"], one_of(ISLANDS),
     one_of(MONTHS)),
    ("The flag of {s} is {o}.", ["What colours is the flag of {s}?"], ["{o}"],
     one_of(COUNTRIES), lambda rng: " and ".join(rng.sample(COLOURS, 2))),
]  # fmt: skip


def context(rng, number):
    """One context of `number` facts, each of another relation (so a question's relation finds
    its sentence), and QUESTIONS_PER_CONTEXT questions about some of them."""
    facts, subjects, text = [], set(), ""
    for sentence, questions, golds, subject_of, object_of in rng.sample(RELATIONS, number):
        subject = subject_of(rng)
        while subject in subjects:  # no name twice as a subject: "Norland" is asked about once
            subject = subject_of(rng)
        subjects.add(subject)
        obj = object_of(rng)
        before, after = sentence.split("{o}")
        text += (" " if text else "") + before.format(s=subject)
        start = len(text)  # where the object begins
        answers = {"text": [], "answer_start": []}
        for gold in golds:
            answers["text"].append(gold.format(o=obj))
            answers["answer_start"].append(start - gold.index("{o}"))
        text += obj + after
        facts.append((rng.choice(questions).format(s=subject), answers))
    return text, rng.sample(facts, QUESTIONS_PER_CONTEXT)


def write(path, rng, contexts, prefix):
    with open(path, "w") as f:
        for c in range(contexts):
            text, questions = context(rng, rng.choice(FACTS))
            for q, (question, answers) in enumerate(questions):
                for gold, start in zip(answers["text"], answers["answer_start"]):
                    assert text[start : start + len(gold)] == gold  # SQuAD's character offsets
                row = {"id": f"{prefix}-{c}-{q}", "context": text, "question": question}
                f.write(json.dumps({**row, "answers": answers}) + "\n")


def vocabulary():
    """The tokens: BERT's special ones, every character (alone and as ##continuation: nothing is
    [UNK]), the words of the sentences and questions, and the pieces names and numbers are made
    of. Listed, not learnt: tokenizers' WordPieceTrainer breaks ties in hash order, so it could
    give another vocabulary on another machine."""
    words = set()
    for sentence, questions, golds, _, _ in RELATIONS:
        for text in [sentence, *questions, *golds]:
            words.update(text.lower().replace("{s}", "").replace("{o}", "").split())
    words = {w.strip(".?") for w in words} | {".", "?", "sea", "metres", "thousand", "and"}
    names = PEOPLE + COUNTRIES + COMPANIES + ISLANDS + RIVERS + MOUNTAINS + BRIDGES + BOOKS
    names += TEAMS + SPORTS + MONTHS + COLOURS + NUMBERS + JOBS + INSTRUMENTS + TOPICS
    words |= {w.lower() for w in names} | {"street"}
    for first, ends in (PLACE, SURNAME, TONGUE):
        words |= {p.lower() for p in first} | {f"##{e}" for e in ends if e}
    words |= {str(n) for n in range(10, 100)} | {f"##{n:02d}" for n in range(100)}  # 1872: 18 ##72
    characters = sorted({c for w in words for c in w.removeprefix("##")} | set("0123456789"))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = characters + [f"##{c}" for c in characters]
    return special + alphabet + sorted(words - set(alphabet) - {""})


def main():
    rng = random.Random(1234)
    (HERE / "data").mkdir(exist_ok=True)
    write(HERE / "data" / "train.jsonl", rng, TRAIN_CONTEXTS, "train")
    write(HERE / "data" / "valid.jsonl", rng, VALID_CONTEXTS, "valid")

    # BERT's tokenizer design, lower-cased; offsets still point into the original text.
    tokens = vocabulary()
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    folder = HERE / "tiny-bert-qa"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
        # BERT's inputs: the token types tell the question (0) from the context (1)
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(folder)
    config = {
        "model_type": "bert",
        "vocab_size": len(tokens),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "max_position_embeddings": 128,
        # No dropout: the facts are clean and many, and dropout only slowed a model trained from
        # scratch down (valid F1 85 instead of 88 after 5 epochs in our trials).
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
