"""The data path: every file type, hub-style dataset folders, ClassLabel ids, the tokenization
cache, and the length-grouped sampler.

    pytest tests/task/test_data.py
"""

import json
import os
import pickle
import random
import warnings

import datasets
import numpy
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

import utils
from conftest import ROOT, tiny_tokenizer
from core import options, resume
from dataset import generate_dataset

TOKENIZER = tiny_tokenizer()


def load(path, max_len=128, labels=None):
    """dataset.py as train.py calls it, with the default options."""
    return generate_dataset(
        path, "train", TOKENIZER, options.parse_args(["--max_len", str(max_len)]), labels
    )


ROWS = [
    ("the food was great", "positive"),
    ("it was fine i guess", "neutral"),
    ("awful, truly", "negative"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def test_parquet_gives_the_same_dataset_as_jsonl(tmp_path):
    datasets.Dataset.from_dict(
        {"text": [t for t, _ in ROWS], "label": [label for _, label in ROWS]}
    ).to_parquet(tmp_path / "a.parquet")
    parquet, jsonl = load(tmp_path / "a.parquet"), load(write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert parquet.labels == jsonl.labels == ["negative", "neutral", "positive"]
    assert [parquet[i] for i in range(3)] == [jsonl[i] for i in range(3)]


def test_txt_is_one_text_per_line_without_labels(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    rows = utils.load_rows(tmp_path / "a.txt")
    assert rows.column_names == ["text"] and rows["text"] == ["first line", "second line"]
    unlabelled = generate_dataset(
        tmp_path / "a.txt",
        "train",
        TOKENIZER,
        options.parse_args([]),
        labels=["negative", "positive"],
        predicting=True,
    )
    assert len(unlabelled) == 2 and "labels" not in unlabelled[0]
    with pytest.raises(SystemExit, match=r"a\.txt: no 'label' column \(found: text\)"):
        load(tmp_path / "a.txt")  # training needs labels


def test_a_hub_style_dataset_folder_with_splits_and_class_label_ids(tmp_path):
    """What --train_file nyu-mll/glue --dataset_config sst2 gives, offline: splits by file name and
    labels stored as ClassLabel ids whose names become the model's labels."""
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    for split, rows in [
        ("train", [("good", 1), ("bad", 0), ("great", 1)]),
        ("validation", [("fine", 1)]),
    ]:
        datasets.Dataset.from_dict(
            {"text": [t for t, _ in rows], "label": [label for _, label in rows]}, features=features
        ).to_parquet(folder / f"{split}.parquet")
    args = options.parse_args([])
    train_set = generate_dataset(str(folder), "train", TOKENIZER, args)
    valid_set = generate_dataset(str(folder), "validation", TOKENIZER, args, train_set.labels)
    assert train_set.labels == ["negative", "positive"]  # names, not the ids 0 and 1
    assert [train_set[i]["labels"] for i in range(3)] == [1, 0, 1] and valid_set[0]["labels"] == 1
    with pytest.raises(SystemExit, match="my-dataset: could not load it .*split 'test'"):
        generate_dataset(str(folder), "test", TOKENIZER, args)


def test_tokenization_is_cached_and_redone_only_when_what_it_depends_on_changes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS * 10)
    first = load(path)
    cache_file = cache_file_of(first)
    written = os.stat(cache_file).st_mtime_ns
    second = load(path)
    assert cache_file_of(second) == cache_file and os.stat(cache_file).st_mtime_ns == written
    assert cache_file_of(load(path, max_len=4)) != cache_file  # another max_len: tokenized again
    write_jsonl(path, ROWS * 11)  # the file changed: tokenized again
    assert len(load(path)) == 33


def cache_file_of(data):
    (cache,) = data.rows.cache_files
    return cache["filename"]


def test_the_rows_are_read_from_the_cache_file_not_loaded():
    dataset = load(ROOT / "data" / "train.jsonl")
    assert isinstance(
        dataset.rows.data, datasets.table.MemoryMappedTable
    )  # a map of the file, nothing held
    everything = range(len(dataset))
    assert dataset.__getitems__(everything) == datasets.Dataset.from_file(
        cache_file_of(dataset)
    ).__getitems__(everything)


def test_rows_are_datasets_own_and_their_lengths_count_their_tokens(tmp_path):
    """The Dataset reads rows through datasets (__getitems__, the batch DataLoader asks for) and
    counts each row's tokens with arrow, in the order of the rows it holds (a selection too)."""
    data = load(write_jsonl(tmp_path / "rows.jsonl", ROWS * 400))
    assert isinstance(data.rows, datasets.Dataset) and os.path.isfile(cache_file_of(data))
    indices = [*random.Random(1).sample(range(len(data)), 100), 0, len(data) - 1, -1]
    assert (
        data.__getitems__(indices) == [data[i] for i in indices] == data.rows.__getitems__(indices)
    )
    assert (
        data[0]["input_ids"][0] == TOKENIZER.cls_token_id and data[2]["labels"] == 0
    )  # negative sorts first
    lengths = data.lengths
    assert lengths.dtype == numpy.int32 and lengths.tolist() == [
        len(row["input_ids"]) for row in data.rows
    ]
    assert sorted(set(lengths.tolist())) == sorted(
        {len(TOKENIZER(text)["input_ids"]) for text, _ in ROWS}
    )
    picked = type(data)(data.rows.select([2, 0, 1]), data.labels, data.tokenizer)
    assert picked.lengths.tolist() == [lengths[2], lengths[0], lengths[1]]
    assert pickle.loads(pickle.dumps(data)).__getitems__(indices) == data.__getitems__(
        indices
    )  # spawned workers


class Lengths:
    """The part of a Dataset that --group_by_length reads."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)


def random_lengths(n):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_length_grouped_sampler_is_a_function_of_seed_and_epoch():
    lengths = random_lengths(500)
    data = Lengths(lengths)

    def order(seed, epoch):
        sampler = resume.LengthGroupedSampler(8, data, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0) and sorted(order(1, 0)) == list(range(500))
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)

    def padded(order):
        return sum(8 * max(lengths[i] for i in order[k : k + 8]) for k in range(0, 500, 8))

    shuffled = torch.randperm(500, generator=torch.Generator().manual_seed(1)).tolist()
    assert padded(order(1, 0)) < 0.7 * padded(shuffled)  # 27048 vs 44392 padded tokens


@pytest.mark.parametrize(
    "n, batch_size, seed", [(500, 8, 1), (97, 4, 7), (5, 8, 3), (3000, 32, 42)]
)
def test_length_grouped_order_is_transformers_own(n, batch_size, seed):
    """The same indices as Trainer's get_length_grouped_indices (ties kept in shuffled order, the
    longest example first), held in int32 tensors instead of Python lists."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = torch.randint(
        3, 12, (n,), generator=torch.Generator().manual_seed(n)
    ).tolist()  # many ties
    lengths[n // 2] = 40  # one longest example, to be moved to the front
    sampler = resume.LengthGroupedSampler(batch_size, Lengths(lengths), seed)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        expected = get_length_grouped_indices(
            lengths, batch_size, generator=torch.Generator().manual_seed(seed + epoch)
        )
        assert list(sampler) == expected


def test_length_grouped_sampler_takes_the_datasets_own_lengths_quietly():
    """Dataset.lengths comes from arrow, read-only: torch warns when a tensor is made over it
    without a copy."""
    data = load(ROOT / "data" / "valid.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order = list(resume.LengthGroupedSampler(8, data, seed=0))
    assert sorted(order) == list(range(len(data)))
    assert len(data[order[0]]["input_ids"]) == max(data.lengths)  # the longest first


def test_length_grouped_batches_are_split_between_two_processes_without_overlap():
    """What accelerator.prepare() does to the train loader with 2 processes."""
    sampler = resume.LengthGroupedSampler(8, Lengths(random_lengths(96)), seed=42)
    shards = [
        list(
            BatchSamplerShard(BatchSampler(sampler, 8, False), num_processes=2, process_index=rank)
        )
        for rank in (0, 1)
    ]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(96)) and len(shards[0]) == len(shards[1]) == 6


def test_a_dataset_without_lengths_is_refused_by_group_by_length():
    with pytest.raises(
        SystemExit, match="--group_by_length: the Dataset of dataset.py has no `lengths`"
    ):
        resume.LengthGroupedSampler(2, [1, 2, 3], 0)


def test_jsonl_csv_and_tsv_give_the_same_dataset(tmp_path):
    rows = [
        ("the food was great", "positive"),
        ('he said "meh', "neutral"),
        ("awful, truly", "negative"),
    ]
    (tmp_path / "a.jsonl").write_text(
        "".join(
            f'{{"text": "{t.replace(chr(34), chr(92) + chr(34))}", "label": "{label}"}}\n'
            for t, label in rows
        )
    )
    (tmp_path / "a.csv").write_text(
        "text,label\n"
        + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{label}\n' for t, label in rows)
    )
    # GLUE-style TSV: a UTF-8 BOM, an unbalanced quote, an extra column
    (tmp_path / "a.tsv").write_text(
        "\ufeffid\ttext\tlabel\n"
        + "".join(f"{i}\t{t}\t{label}\n" for i, (t, label) in enumerate(rows)),
        encoding="utf-8",
    )
    datasets = [load(tmp_path / f"a.{ext}", 32) for ext in ("jsonl", "csv", "tsv")]
    for dataset in datasets:
        assert dataset.labels == ["negative", "neutral", "positive"]
        assert [dataset[i] for i in range(3)] == [datasets[0][i] for i in range(3)]
    assert datasets[0][0]["labels"] == 2


def test_collate_pads_per_batch_not_to_max_len():
    dataset = load(ROOT / "data" / "valid.jsonl")
    batch = dataset.collate([dataset[i] for i in range(4)])
    longest = max(len(dataset[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and longest < 128
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["attention_mask"].sum().item() == sum(
        len(dataset[i]["input_ids"]) for i in range(4)
    )


def test_the_shuffled_sampler_is_a_function_of_seed_and_epoch_through_accelerate():
    """train.py's default order: every example once per epoch, another order each epoch, the same
    order for the same (seed, epoch) after a restart, and set_epoch reaching it through
    prepare()."""
    from accelerate import Accelerator

    accelerator = Accelerator()

    def orders(seed):
        loader = accelerator.prepare(
            torch.utils.data.DataLoader(
                list(range(50)), 8, sampler=resume.ShuffledSampler(50, seed)
            )
        )
        result = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            result.append([int(i) for batch in loader for i in batch])
        return result

    first, again, other = orders(42), orders(42), orders(7)
    assert sorted(first[0]) == sorted(first[1]) == list(range(50)) and first[0] != first[1]
    assert first == again and first != other


def test_the_shuffled_order_is_torchs_permutation_held_in_int32():
    sampler = resume.ShuffledSampler(100_000, seed=3)
    sampler.set_epoch(2)
    assert sampler.order().dtype == torch.int32  # 4 bytes an example
    assert (
        list(sampler)
        == torch.randperm(100_000, generator=torch.Generator().manual_seed(5)).tolist()
    )
