"""The data path: every file type, hub-style dataset folders, ClassLabel ids, the tokenization cache,
and the length-grouped sampler.

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

from core import options
import utils
from core import samplers
from conftest import ROOT, tiny_tokenizer
from dataset import generate_dataset

TOKENIZER = tiny_tokenizer()


def load(path, max_len=128, labels=None):
    """dataset.py as train.py calls it, with the default options."""
    return generate_dataset(path, "train", TOKENIZER, options.parse_args(["--max_len", str(max_len)]), labels)

ROWS = [("the food was great", "positive"), ("it was fine i guess", "neutral"), ("awful, truly", "negative")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return path


def test_parquet_gives_the_same_dataset_as_jsonl(tmp_path):
    datasets.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [l for _, l in ROWS]}).to_parquet(
        tmp_path / "a.parquet")
    parquet, jsonl = load(tmp_path / "a.parquet"), load(write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert parquet.labels == jsonl.labels == ["negative", "neutral", "positive"]
    assert [parquet[i] for i in range(3)] == [jsonl[i] for i in range(3)]


def test_txt_is_one_text_per_line_without_labels(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    rows = utils.load_rows(tmp_path / "a.txt")
    assert rows.column_names == ["text"] and rows["text"] == ["first line", "second line"]
    unlabelled = generate_dataset(tmp_path / "a.txt", "train", TOKENIZER, options.parse_args([]),
                                        labels=["negative", "positive"], predicting=True)
    assert len(unlabelled) == 2 and "labels" not in unlabelled[0]
    with pytest.raises(SystemExit, match=r"a\.txt: no 'label' column \(found: text\)"):
        load(tmp_path / "a.txt")  # training needs labels


def test_a_hub_style_dataset_folder_with_splits_and_class_label_ids(tmp_path):
    """What --train_file nyu-mll/glue --dataset_config sst2 gives, offline: splits by file name and
    labels stored as ClassLabel ids whose names become the model's labels."""
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    for split, rows in [("train", [("good", 1), ("bad", 0), ("great", 1)]), ("validation", [("fine", 1)])]:
        datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [l for _, l in rows]},
                                   features=features).to_parquet(folder / f"{split}.parquet")
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
    cache_file = first.rows.path
    written = os.stat(cache_file).st_mtime_ns
    second = load(path)
    assert second.rows.path == cache_file and os.stat(cache_file).st_mtime_ns == written
    assert load(path, max_len=4).rows.path != cache_file  # another max_len: tokenized again
    write_jsonl(path, ROWS * 11)  # the file changed: tokenized again
    assert len(load(path)) == 33


def test_the_rows_are_read_from_the_cache_file_not_loaded():
    dataset = load(ROOT / "data" / "train.jsonl")
    assert dataset.rows.dataset is None and os.path.isfile(dataset.rows.path)  # read by hand, nothing held
    everything = range(len(dataset))
    assert dataset.rows.__getitems__(everything) == datasets.Dataset.from_file(dataset.rows.path).__getitems__(everything)


def cached(tmp_path, columns, rows_per_batch=700):
    """A datasets.Dataset of `columns` cached in a file of record batches of `rows_per_batch` rows."""
    source = datasets.Dataset.from_dict({"n": list(range(len(next(iter(columns.values())))))})
    return source.map(lambda batch, indices: {k: [v[i] for i in indices] for k, v in columns.items()}, batched=True,
                      with_indices=True, batch_size=rows_per_batch, writer_batch_size=rows_per_batch,
                      remove_columns=["n"], cache_file_name=str(tmp_path / "rows.arrow"))


def numbers_of_every_kind(n):
    generator = random.Random(0)
    return {"input_ids": [[generator.randrange(50_000) for _ in range(generator.randrange(0, 20))] for _ in range(n)],
            "labels": [generator.randrange(3) for _ in range(n)], "score": [generator.random() for _ in range(n)],
            "vector": [[generator.random() for _ in range(3)] for _ in range(n)]}


def test_cached_rows_read_by_hand_are_datasets_own(tmp_path):
    rows = cached(tmp_path, numbers_of_every_kind(5000))
    mine = utils.CachedRows(rows)
    assert mine.dataset is None and len(mine.batches) == 8 and len(mine) == 5000  # read by hand, 8 record batches
    indices = [*random.Random(1).sample(range(5000), 500), 0, 4999, -1, -5000]
    assert mine.__getitems__(indices) == rows.__getitems__(indices)
    assert mine[-1] == rows[-1] and mine[699] == rows[699] and mine[700] == rows[700]  # across a batch boundary
    assert mine.lengths("input_ids").tolist() == [len(ids) for ids in rows["input_ids"]]
    assert mine.lengths("input_ids").dtype == numpy.int32
    for outside in (5000, -5001):
        with pytest.raises(IndexError):
            mine[outside]
    assert pickle.loads(pickle.dumps(mine)).__getitems__(indices) == rows.__getitems__(indices)  # spawned workers


def test_cached_rows_read_anything_else_through_datasets(tmp_path):
    numbers = cached(tmp_path, numbers_of_every_kind(50))
    others = {"strings": cached(tmp_path / "s", {"text": ["a", "b"]}),
              "nulls": cached(tmp_path / "n", {"labels": [1, None]}),
              "booleans": cached(tmp_path / "b", {"mask": [[True], [False]]}),
              "rows selected": numbers.select([3, 1, 2]), "a format": numbers.with_format("numpy"),
              "columns chosen": numbers.with_format(None, columns=["labels"]),
              "a column replaced": numbers.remove_columns("vector").add_column("vector", [[0.0]] * 50),
              "a row added": numbers.skip(1).add_item(numbers[0]),
              "columns renamed": numbers.rename_columns({"labels": "score", "score": "labels"}).select_columns(
                  ["input_ids", "labels", "score", "vector"]),
              "in memory": datasets.Dataset.from_dict({"labels": [1, 2]})}
    for name, rows in others.items():
        mine = utils.CachedRows(rows)
        assert mine.dataset is rows, name
        assert str(mine.__getitems__([1, 0])) == str(rows.__getitems__([1, 0])) and len(mine) == len(rows), name
    lengths = utils.CachedRows(numbers.select([3, 1])).lengths("input_ids")
    assert lengths.tolist() == [len(numbers[3]["input_ids"]), len(numbers[1]["input_ids"])] and lengths.dtype == numpy.int32


def test_cached_rows_with_empty_lists_and_a_file_replaced(tmp_path):
    rows = cached(tmp_path, {"input_ids": [[1, 2]] * 700 + [[]] * 700, "labels": [0] * 1400})  # a batch of empty lists
    mine = utils.CachedRows(rows)
    assert mine.dataset is None and mine.__getitems__([0, 700, 1399]) == rows.__getitems__([0, 700, 1399])
    copy = pickle.loads(pickle.dumps(mine))  # what a spawned DataLoader worker gets: it opens the file again
    cached(tmp_path / "other", {"input_ids": [[3]] * 1400, "labels": [1] * 1400}, rows_per_batch=1000)
    os.replace(tmp_path / "other" / "rows.arrow", tmp_path / "rows.arrow")  # another layout under the same name
    with pytest.raises(SystemExit, match="rows.arrow: this cache file of the tokenized data was deleted or replaced"):
        copy[0]
    assert mine[700] == {"input_ids": [], "labels": 0}  # the file this one opened: read to the end


def mapped_kib(path):
    """KiB of the file at `path` in this process's resident memory through memory maps (/proc/self/smaps)."""
    kib, mapping = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if line[0] in "0123456789abcdef":  # a mapping: address range, perms, offset, device, inode, path
                mapping = fields[5] if len(fields) > 5 else None
            elif fields[0] == "Rss:" and mapping == str(path):
                kib += int(fields[1])
    return kib


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_random_rows_read_by_hand_map_no_page_of_the_cache(tmp_path):
    n = 200_000
    rows = cached(tmp_path, {"input_ids": [[i] * (i % 40) for i in range(n)], "labels": [i % 3 for i in range(n)]},
                  rows_per_batch=10_000)
    mine, path = utils.CachedRows(rows), tmp_path / "rows.arrow"
    batch = random.Random(0).sample(range(n), 64)
    before = mapped_kib(path)  # datasets' map of it: the record batches' headers, read when it opened
    read, lengths = mine.__getitems__(batch), mine.lengths("input_ids")
    assert mapped_kib(path) <= before
    assert read == rows.__getitems__(batch) and lengths.tolist() == [i % 40 for i in range(n)]
    assert mapped_kib(path) - before >= 64 * 4  # through the map: 4 KiB or more for each random row


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
        sampler = samplers.LengthGroupedSampler(8, data, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0) and sorted(order(1, 0)) == list(range(500))
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    padded = lambda order: sum(8 * max(lengths[i] for i in order[k:k + 8]) for k in range(0, 500, 8))
    shuffled = torch.randperm(500, generator=torch.Generator().manual_seed(1)).tolist()
    assert padded(order(1, 0)) < 0.7 * padded(shuffled)  # 27048 vs 44392 padded tokens


@pytest.mark.parametrize("n, batch_size, seed", [(500, 8, 1), (97, 4, 7), (5, 8, 3), (3000, 32, 42)])
def test_length_grouped_order_is_transformers_own(n, batch_size, seed):
    """The same indices as Trainer's get_length_grouped_indices (ties kept in shuffled order, the
    longest example first), held in int32 tensors instead of Python lists."""
    from transformers.trainer_pt_utils import get_length_grouped_indices
    lengths = torch.randint(3, 12, (n,), generator=torch.Generator().manual_seed(n)).tolist()  # many ties
    lengths[n // 2] = 40  # one longest example, to be moved to the front
    sampler = samplers.LengthGroupedSampler(batch_size, Lengths(lengths), seed)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        expected = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed + epoch))
        assert list(sampler) == expected


def test_length_grouped_sampler_takes_the_datasets_own_lengths_quietly():
    """Dataset.lengths comes from arrow, read-only: torch warns when a tensor is made over it without a copy."""
    data = load(ROOT / "data" / "valid.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order = list(samplers.LengthGroupedSampler(8, data, seed=0))
    assert sorted(order) == list(range(len(data)))
    assert len(data[order[0]]["input_ids"]) == max(data.lengths)  # the longest first


def test_length_grouped_batches_are_split_between_two_processes_without_overlap():
    """What accelerator.prepare() does to the train loader with 2 processes."""
    sampler = samplers.LengthGroupedSampler(8, Lengths(random_lengths(96)), seed=42)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 8, False), num_processes=2, process_index=rank))
              for rank in (0, 1)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(96)) and len(shards[0]) == len(shards[1]) == 6


def test_a_dataset_without_lengths_is_refused_by_group_by_length():
    with pytest.raises(SystemExit, match="--group_by_length: the Dataset of dataset.py has no `lengths`"):
        samplers.LengthGroupedSampler(2, [1, 2, 3], 0)


def test_jsonl_csv_and_tsv_give_the_same_dataset(tmp_path):
    rows = [("the food was great", "positive"), ('he said "meh', "neutral"), ("awful, truly", "negative")]
    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "{t.replace(chr(34), chr(92) + chr(34))}", "label": "{l}"}}\n'
                                              for t, l in rows))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{l}\n' for t, l in rows))
    # GLUE-style TSV: a UTF-8 BOM, an unbalanced quote, an extra column
    (tmp_path / "a.tsv").write_text("\ufeffid\ttext\tlabel\n" + "".join(f"{i}\t{t}\t{l}\n" for i, (t, l) in enumerate(rows)),
                                    encoding="utf-8")
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
    assert batch["attention_mask"].sum().item() == sum(len(dataset[i]["input_ids"]) for i in range(4))


def test_the_shuffled_sampler_is_a_function_of_seed_and_epoch_through_accelerate():
    """train.py's default order: every example once per epoch, another order each epoch, the same
    order for the same (seed, epoch) after a restart, and set_epoch reaching it through prepare()."""
    from accelerate import Accelerator
    accelerator = Accelerator()

    def orders(seed):
        loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(50)), 8,
                                                                 sampler=samplers.ShuffledSampler(50, seed)))
        result = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            result.append([int(i) for batch in loader for i in batch])
        return result
    first, again, other = orders(42), orders(42), orders(7)
    assert sorted(first[0]) == sorted(first[1]) == list(range(50)) and first[0] != first[1]
    assert first == again and first != other


def test_the_shuffled_order_is_torchs_permutation_held_in_int32():
    sampler = samplers.ShuffledSampler(100_000, seed=3)
    sampler.set_epoch(2)
    assert sampler.order().dtype == torch.int32  # 4 bytes an example
    assert list(sampler) == torch.randperm(100_000, generator=torch.Generator().manual_seed(5)).tolist()
