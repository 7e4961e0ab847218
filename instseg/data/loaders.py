"""Datasets and DataLoaders for a config: the one place splits, augmentation and collate meet."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from instseg.config import DataConfig
from instseg.data.coco import CocoInstanceDataset, LabelMap, check_dataset_root


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in instance count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_datasets(data: DataConfig) -> tuple[CocoInstanceDataset, CocoInstanceDataset]:
    check_dataset_root(data.root, (data.train_split, data.val_split))
    train = CocoInstanceDataset(data.root, data.train_split, hflip_prob=data.hflip_prob, on_invalid=data.on_invalid)
    val = CocoInstanceDataset(data.root, data.val_split, label_map=train.label_map, on_invalid=data.on_invalid)
    return train, val


def build_loader(dataset: CocoInstanceDataset, data: DataConfig, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=shuffle,
        num_workers=data.num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=data.num_workers > 0,
    )


def label_map_of(data: DataConfig) -> LabelMap:
    """The label mapping of the training split, without decoding any image."""
    return CocoInstanceDataset(data.root, data.train_split).label_map
