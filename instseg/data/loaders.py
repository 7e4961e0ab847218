"""Datasets and DataLoaders for a config: the one place splits, augmentation and collate meet."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset, check_dataset_root
from instseg.data.index import build_progress, ensure_index


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def prepare_indexes(data: DataConfig, write: Callable[[str], None] | None = None) -> dict[str, str]:
    """Split -> annotation index folder for the training and validation splits, each found or built (with a
    bar or progress lines through `write`, and its time, when it is built); a driver calls this once and hands
    the folders to every worker and trial (build_datasets)."""
    check_dataset_root(data.root, (data.train_split, data.val_split))
    folders = {}
    for split in dict.fromkeys((data.train_split, data.val_split)):
        progress = build_progress(split, write) if write is not None else None
        build = ensure_index(data.root, split, data.index_cache, progress=progress)
        if build.built and write is not None:
            write(build.describe(split))
        folders[split] = str(build.folder)
    return folders


def build_datasets(
    data: DataConfig, indexes: Mapping[str, str] | None = None
) -> tuple[CocoInstanceDataset, CocoInstanceDataset]:
    """The training and validation datasets; `indexes` (split -> index folder) are the annotation indexes the
    driver found or built (instseg.data.prepare), so that a worker neither parses nor fingerprints the data."""
    check_dataset_root(data.root, (data.train_split, data.val_split))
    indexes = indexes or {}
    common = {"on_invalid": data.on_invalid, "index_cache": data.index_cache}
    train = CocoInstanceDataset(
        data.root, data.train_split, hflip_prob=data.hflip_prob, index=indexes.get(data.train_split), **common
    )
    val = CocoInstanceDataset(
        data.root, data.val_split, label_map=train.label_map, index=indexes.get(data.val_split), **common
    )
    return train, val


def loader_options(data: DataConfig) -> dict:
    """Worker processes, collate and transfer settings every loader of a run shares. Pinned memory only
    helps (and only exists) with a GPU; persistent workers only with worker processes."""
    return {
        "num_workers": data.num_workers,
        "collate_fn": collate,
        "pin_memory": data.pin_memory and torch.cuda.is_available(),
        "persistent_workers": data.persistent_workers and data.num_workers > 0,
    }


def build_loader(
    dataset: CocoInstanceDataset, data: DataConfig, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """A shuffled or sharded loader draws through a DistributedSampler (rank `rank` of `world_size`):
    call its set_epoch every epoch; the order is then a function of (seed, epoch), the same on every rank
    and after a restart from a checkpoint. Built here rather than by Ray Train's prepare_data_loader,
    which rebuilds the loader and drops persistent_workers."""
    if not shuffle and world_size == 1:
        return DataLoader(dataset, batch_size=data.batch_size, shuffle=False, **loader_options(data))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, **loader_options(data))


def shard_loader(dataset: CocoInstanceDataset, data: DataConfig, rank: int, world_size: int) -> DataLoader:
    """Rank `rank`'s share of `dataset` for evaluation: every world_size-th image, no padding (a
    DistributedSampler repeats images to even out shards, which would count them twice)."""
    return DataLoader(
        Subset(dataset, range(rank, len(dataset), world_size)), batch_size=data.batch_size, **loader_options(data)
    )


class AspectRatioBatchSampler(Sampler[list[int]]):
    """Batches of images on the same side of square (landscape or portrait), drawn in the order of
    `sampler` (a DistributedSampler included), so that padding to the batch's largest image wastes
    little. Leftovers of each group are yielded at the end of the epoch."""

    def __init__(self, sampler: Sampler[int], landscape: list[bool], batch_size: int) -> None:
        self.sampler = sampler
        self.landscape = landscape
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[bool, list[int]] = {True: [], False: []}
        for index in self.sampler:
            bucket = buckets[self.landscape[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                yield bucket

    def __len__(self) -> int:
        wide = sum(self.landscape[i] for i in self.sampler)
        return math.ceil(wide / self.batch_size) + math.ceil((len(self.sampler) - wide) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def group_by_aspect_ratio(loader: DataLoader, dataset: CocoInstanceDataset, data: DataConfig) -> DataLoader:
    """The same loader (its sampler kept, e.g. the DistributedSampler Ray Train added) with batches grouped."""
    widths, heights = dataset.image_sizes()
    landscape = (widths >= heights).tolist()
    sampler = AspectRatioBatchSampler(loader.sampler, landscape, data.batch_size)
    return DataLoader(dataset, batch_sampler=sampler, **loader_options(data))
