"""The training order: a seeded shuffle, or batches of similar length, each a function of (seed,
epoch) only, so that a resumed epoch replays the same batches."""

import torch

from utils import UserError


class ShuffledSampler(torch.utils.data.Sampler):
    """A random order of the examples that is a function of (seed, epoch) only, like accelerate's
    seedable sampler (so a resumed epoch replays it), held as one int32 tensor (4 bytes an example;
    torch draws the same permutation as in int64) and handed out in chunks: the list of Python ints
    that sampler makes costs ~36 bytes an example."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def order(self):
        return torch.randperm(
            self.size,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            dtype=torch.int32 if self.size < 2**31 else torch.int64,
        )

    def __iter__(self):
        for chunk in self.order().split(1 << 12):
            yield from chunk.tolist()


class LengthGroupedSampler(ShuffledSampler):
    """--group_by_length: Trainer's order (the shuffled order cut into chunks of 50 batches, each
    sorted by length, longest first, and the longest example moved to the very front: the indices of
    transformers' get_length_grouped_indices), as a function of (seed, epoch) like ShuffledSampler,
    so that a resumed epoch replays the same batches. Written here because Trainer's makes Python
    lists of every index and length (~70 bytes an example); this one holds int32 tensors.
    `batch_size`: the examples of one optimizer step (train.py: --batch_size x --accumulation x
    processes, which take consecutive batches), so that every split of a step groups alike."""

    def __init__(self, batch_size, dataset, seed):
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise UserError(
                "--group_by_length: the Dataset of dataset.py has no `lengths` (one length per sample)."
            )
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = (
            torch.tensor(lengths, dtype=torch.int32),
            batch_size,
        )  # a copy: arrow's are read-only

    def __iter__(self):
        chunk = max(min(self.size // (self.batch_size * 4), 50), 1) * self.batch_size
        chunks = [
            c[torch.argsort(self.lengths[c], descending=True, stable=True)]
            for c in self.order().split(chunk)
        ]
        longest = int(
            torch.stack([self.lengths[c[0]] for c in chunks]).argmax()
        )  # the first, on ties
        chunks[0][0], chunks[longest][0] = int(chunks[longest][0]), int(chunks[0][0])
        for c in chunks:
            yield from c.tolist()
