"""The LightningDataModule, with a data order that is a pure function of the iteration.

Training is counted in iterations, not epochs (docs/method.md: 60k iterations on Cityscapes). Sample
``p`` of the run (p = micro-batch x global batch + rank x batch + j) is item
``permutation(seed, epoch)[p mod n]`` of the dataset, augmented under an RNG seeded from
``(seed, p)``. So the batches do not depend on worker count, process restarts or how many
iterations ran before: ``--resume`` at iteration k feeds exactly the batches an uninterrupted
run would have fed from k on, on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from annseg.engine.builders import build_train_dataset, build_val_dataset
from annseg.engine.config import Config


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class IterationDataset(Dataset):
    """Position ``p`` of the run -> a deterministic item of ``dataset``, deterministically augmented."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:  # positions are unbounded; the sampler decides which are read
        return len(self.dataset)  # type: ignore[arg-type]

    def _index(self, position: int) -> int:
        size = len(self.dataset)  # type: ignore[arg-type]
        epoch, offset = divmod(position, size)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng(_seed(self.seed, epoch)).permutation(size)}
        return int(self._orders[epoch][offset])

    def __getitem__(self, position: int) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, 1 << 20, position))
            return self.dataset[self._index(position)]


class IterationSampler(Sampler[int]):
    """This rank's positions for micro-batches ``start .. stop - 1``, in order.

    The whole run is one epoch. Its length is the whole run's (``stop`` micro-batches) even
    when it starts later: a resumed Lightning loop counts the epoch's batches from 0 (it
    restores the batch index), so a length of only the remaining batches ends the epoch early
    and the next epoch would replay the data from ``start``.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.stop * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for micro_batch in range(self.start, self.stop):
            first = (micro_batch * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)


def collate(items: list[dict]) -> dict:
    """Stack items into a batch (plain tensors); a clear error when image sizes differ."""
    sizes = {tuple(item["image"].shape[-2:]) for item in items}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch differ in size {sorted(sizes)}: set data.val_batch_size: 1 "
                         "for datasets whose images vary in size")
    return {
        "image": torch.stack([item["image"].as_subclass(torch.Tensor) for item in items]),
        "mask": torch.stack([item["mask"].as_subclass(torch.Tensor) for item in items]),
        "name": [item["name"] for item in items],
    }


class SegmentationDataModule(L.LightningDataModule):
    """Train and validation loaders for a run's config (datasets built on first use)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = build_train_dataset(self.config)
        if self.val_set is None:
            self.val_set = build_val_dataset(self.config)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | list[int], drop_last: bool) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
            collate_fn=collate, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.config.train.seed),  # leaves the global RNG alone
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup('fit') runs first"
        train = self.config.train
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        start = (trainer.global_step if trainer is not None else 0) * train.accumulate
        sampler = IterationSampler(start, train.max_iters * train.accumulate, self.config.data.batch_size, rank, world)
        return self._loader(IterationDataset(self.train_set, train.seed), self.config.data.batch_size, sampler, True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup() runs first"
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Every item exactly once across ranks (no padding, unlike DistributedSampler): the
        # confusion matrices are summed, so uneven shards are fine.
        indices = list(range(rank, len(self.val_set), world))  # type: ignore[arg-type]
        return self._loader(self.val_set, self.config.data.val_batch_size, indices, False)
