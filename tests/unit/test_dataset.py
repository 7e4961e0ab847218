import pytest
import torch

from instseg.data.coco import CocoInstanceDataset, LabelMap, check_dataset_root
from instseg.data.loaders import build_datasets, build_loader
from instseg.errors import DataError


def test_target_schema(synth_root):
    dataset = CocoInstanceDataset(synth_root, "train")
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.max() > 0  # scaled to [0, 1] on the device
    n = len(target["labels"])
    assert n > 0
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].min() >= 1
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, *image.shape[1:])
    assert target["area"].shape == (n,) and target["iscrowd"].shape == (n,)
    assert target["image_id"] == dataset.image_ids[0]
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # every mask lies inside its box (1 px rounding slack)
    for mask, (x1, y1, x2, y2) in zip(target["masks"], boxes.tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= int(x1) - 1 and xs.max() <= x2 + 1 and ys.min() >= int(y1) - 1 and ys.max() <= y2 + 1


def test_label_map_round_trips_and_maps_category_ids():
    label_map = LabelMap.from_categories([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}])
    assert label_map.names == ("person", "toothbrush")
    assert label_map.label(90) == 2 and label_map.category_id(2) == 90 and label_map.num_classes == 3
    assert LabelMap.from_dict(label_map.to_dict()) == label_map


def test_flip_moves_boxes_and_masks_together(synth_root):
    image, target = CocoInstanceDataset(synth_root, "train")[0]
    flipped_image, flipped = CocoInstanceDataset(synth_root, "train", hflip_prob=1.0)[0]
    width = image.shape[-1]
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.allclose(flipped["boxes"][:, 0], width - target["boxes"][:, 2])
    assert torch.allclose(flipped["boxes"][:, 2], width - target["boxes"][:, 0])
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    again = CocoInstanceDataset(synth_root, "train", hflip_prob=1.0)
    assert torch.equal(again[0][1]["masks"], again[0][1]["masks"]), "cached crops give the same masks every time"
    assert torch.equal(CocoInstanceDataset(synth_root, "train", hflip_prob=0.0)[0][1]["masks"], target["masks"])


def test_loader_batches_lists(synth_root, tiny_config):
    cfg = tiny_config("data.batch_size=3")
    train, val = build_datasets(cfg.data)
    assert val.label_map == train.label_map
    images, targets = next(iter(build_loader(train, cfg.data, shuffle=True)))
    assert len(images) == len(targets) == 3


def test_missing_dataset_says_which_path_and_how_to_create(tmp_path):
    with pytest.raises(DataError) as err:
        check_dataset_root(tmp_path / "nothing", ("train",))
    assert str(tmp_path / "nothing" / "annotations" / "instances_train.json") in str(err.value)
    assert "instseg data synth" in str(err.value)


def test_aspect_ratio_batches_never_mix_orientations_and_cover_every_index():
    from torch.utils.data import SequentialSampler

    from instseg.data.loaders import AspectRatioBatchSampler

    landscape = [True, False, True, True, False, False, True, False, True]
    sampler = AspectRatioBatchSampler(SequentialSampler(range(len(landscape))), landscape, batch_size=2)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(landscape)))
    assert all(len({landscape[i] for i in batch}) == 1 for batch in batches)
    assert len(batches) == len(sampler) == 5


def test_distributed_loaders_shard_without_overlap_and_reshuffle_each_epoch(synth_root, tiny_config):
    cfg = tiny_config("data.num_workers=1")
    train, _ = build_datasets(cfg.data)
    loaders = [build_loader(train, cfg.data, shuffle=True, seed=3, rank=rank, world_size=2) for rank in range(2)]
    assert all(loader.persistent_workers for loader in loaders), "the config's persistent_workers survives sharding"

    def order(epoch: int) -> list[list[int]]:
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        return [list(loader.sampler) for loader in loaders]

    first, second = order(0), order(1)
    assert set(first[0]).isdisjoint(first[1]) or len(train) % 2  # padding repeats at most one image
    assert set(first[0]) | set(first[1]) == set(range(len(train)))
    assert first != second, "set_epoch reshuffles"
    assert order(0) == first, "the same epoch gives the same shards on every rank"


def test_one_process_shuffle_depends_only_on_seed_and_epoch(synth_root, tiny_config):
    """So a run restarted from a checkpoint sees the epochs in the order an uninterrupted run would."""
    cfg = tiny_config()
    train, _ = build_datasets(cfg.data)
    first, again = (build_loader(train, cfg.data, shuffle=True, seed=5) for _ in range(2))
    first.sampler.set_epoch(2)
    list(again.sampler)  # an epoch drawn before the restart changes nothing
    again.sampler.set_epoch(2)
    assert list(first.sampler) == list(again.sampler)
    again.sampler.set_epoch(3)
    assert list(first.sampler) != list(again.sampler)
