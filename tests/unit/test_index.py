"""The annotation index (instseg.data.index) and the dataset that reads it: targets identical to the dataset before
the index (tests/legacy_dataset.py) on every dataset we have, the same problems and policy, one index per version
of a split, written atomically, found by every reader, shared by loader workers."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from instseg.data.coco import CocoInstanceDataset, dataset_fingerprint
from instseg.data.files import INDEX_FOLDER, is_our_dataset
from instseg.data.formats import annotation_path, convert
from instseg.data.index import AnnotationIndex, ensure_index, split_fingerprint
from instseg.data.loaders import collate, prepare_indexes
from instseg.data.synth import synthesize
from instseg.errors import DataError
from tests.helpers import shared_dataset
from tests.legacy_dataset import LegacyCocoDataset


def _assert_same_samples(ours: CocoInstanceDataset, legacy: LegacyCocoDataset) -> int:
    """Every sample: pixels and every target field equal, with the same dtypes and shapes."""
    assert ours.image_ids == legacy.image_ids and len(ours) == len(legacy)
    assert ours.label_map == legacy.label_map and dict(ours.skipped) == dict(legacy.skipped)
    for index in range(len(legacy)):
        image, target = ours[index]
        expected_image, expected = legacy[index]
        assert torch.equal(image, expected_image)
        assert target.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                got = target[key]
                assert got.dtype == value.dtype and got.shape == value.shape, (key, index)
                assert torch.equal(got, value), (key, index)
            else:
                assert target[key] == value and type(target[key]) is type(value), (key, index)
    return len(legacy)


@pytest.fixture(scope="module")
def shared_copies(tmp_path_factory) -> dict[str, Path]:
    """coco8-seg and coco128-seg in our COCO layout."""
    out = {}
    for name in ("coco8-seg", "coco128-seg"):
        out[name] = tmp_path_factory.mktemp("shared") / name
        convert(shared_dataset(name), out[name], names="coco80")
    return out


@pytest.mark.parametrize("name", ["synth", "coco8-seg", "coco128-seg"])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_targets_are_those_of_the_dataset_before_the_index(name, flip, synth_root, shared_copies):
    root = synth_root if name == "synth" else shared_copies[name]
    splits = sorted(path.name for path in (root / "images").iterdir())
    train = CocoInstanceDataset(root, splits[0], hflip_prob=flip)
    for split in splits:
        label_map = train.label_map if split != splits[0] else None  # validation takes training's classes
        torch.manual_seed(0)
        ours = CocoInstanceDataset(root, split, label_map=label_map, hflip_prob=flip)
        legacy = LegacyCocoDataset(root, split, label_map=label_map, hflip_prob=flip)
        assert _assert_same_samples(ours, legacy) > 0
        assert ours.coco.dataset == legacy.coco.dataset  # COCO evaluation reads the same ground truth
        assert ours.num_instances == len(legacy.coco.getAnnIds(legacy.image_ids))


def test_random_flips_draw_the_same_numbers_as_before(synth_root):
    """The flip is drawn from torch's generator as before: a seeded run sees the same flips."""
    torch.manual_seed(3)
    ours = [CocoInstanceDataset(synth_root, "train", hflip_prob=0.5)[i] for i in range(6)]
    torch.manual_seed(3)
    legacy = [LegacyCocoDataset(synth_root, "train", hflip_prob=0.5)[i] for i in range(6)]
    assert all(torch.equal(a[1]["masks"], b[1]["masks"]) for a, b in zip(ours, legacy))


def _broken(root: Path) -> None:
    """Several problems at once: a bad polygon, an annotation of no image, a missing image file, a category the
    model (the training split's label map) does not have."""
    path = annotation_path(root, "val")
    coco = json.loads(path.read_text())
    coco["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]
    coco["annotations"][1]["image_id"] = 99999
    coco["annotations"][2]["category_id"] = 77
    coco["categories"].append({"id": 77, "name": "unknown to the model"})
    path.write_text(json.dumps(coco))
    (root / "images" / "val" / coco["images"][-1]["file_name"]).unlink()


def test_skip_drops_and_counts_what_the_dataset_before_the_index_dropped(synth_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    _broken(root)
    label_map = CocoInstanceDataset(root, "train").label_map
    ours = CocoInstanceDataset(root, "val", label_map=label_map, on_invalid="skip")
    legacy = LegacyCocoDataset(root, "val", label_map=label_map, on_invalid="skip")
    assert set(ours.skipped) == {"polygon_too_few_points", "unknown_image", "image_missing", "unknown_category"}
    _assert_same_samples(ours, legacy)
    assert ours.coco.dataset == legacy.coco.dataset
    with pytest.raises(DataError) as ours_error:
        CocoInstanceDataset(root, "val", label_map=label_map)
    with pytest.raises(DataError) as legacy_error:
        LegacyCocoDataset(root, "val", label_map=label_map)
    assert str(ours_error.value) == str(legacy_error.value)


def test_a_moved_dataset_names_its_new_paths(synth_root, tmp_path):
    """The index travels with a copied or moved folder (its name is the data's fingerprint, not its path)."""
    root = tmp_path / "first"
    shutil.copytree(synth_root, root)
    _broken(root)
    with pytest.raises(DataError):
        CocoInstanceDataset(root, "val")
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    with pytest.raises(DataError) as refused:
        CocoInstanceDataset(moved, "val")
    assert str(moved) in str(refused.value) and str(root) + os.sep not in str(refused.value)


def test_one_index_per_version_found_by_every_reader(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns(INDEX_FOLDER))
    first = ensure_index(root, "train")
    assert first.built and first.folder.parent == root / INDEX_FOLDER
    assert first.folder.name.startswith(f"train-{split_fingerprint(root, 'train')}-")
    again = ensure_index(root, "train")
    assert not again.built and again.folder == first.folder
    # a changed split is a new version: a new index, and the dataset reads it
    path = annotation_path(root, "train")
    coco = json.loads(path.read_text())
    coco["annotations"] = coco["annotations"][1:]
    path.write_text(json.dumps(coco))
    changed = ensure_index(root, "train")
    assert changed.built and changed.folder != first.folder
    dataset = CocoInstanceDataset(root, "train")
    assert dataset.index.folder == changed.folder
    assert dataset.num_instances == len(coco["annotations"])
    # an index folder handed over by a driver is opened as it is; one this node cannot see is found again
    assert CocoInstanceDataset(root, "train", index=changed.folder).index.folder == changed.folder
    assert CocoInstanceDataset(root, "train", index=tmp_path / "elsewhere").index.folder == changed.folder


def test_the_index_cache_can_live_elsewhere_and_says_when_it_cannot_be_written(synth_root, tmp_path):
    cache = tmp_path / "cache"
    build = ensure_index(synth_root, "val", cache)
    assert build.folder.parent == cache and (build.folder / "meta.json").is_file()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    with pytest.raises(DataError, match="set data.index_cache to a writable folder"):
        CocoInstanceDataset(synth_root, "val", index_cache=blocked / "sub")


def _build(root: str, queue) -> None:
    queue.put(str(ensure_index(root, "train", workers=1).folder))


def test_builders_racing_for_one_version_both_end_with_one_whole_index(synth_root, tmp_path):
    root = tmp_path / "race"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns(INDEX_FOLDER))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    builders = [context.Process(target=_build, args=(str(root), queue)) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(120)
    assert [builder.exitcode for builder in builders] == [0, 0]
    folders = {queue.get(timeout=5) for _ in builders}
    assert len(folders) == 1
    assert [p.name for p in (root / INDEX_FOLDER).iterdir()] == [Path(folders.pop()).name]  # no temp folder left
    assert len(AnnotationIndex(ensure_index(root, "train").folder)) == 12


def test_loader_workers_read_the_same_targets_from_the_shared_index(synth_root):
    dataset = CocoInstanceDataset(synth_root, "train")
    alone = [dataset[i][1] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
    together = [target for _, targets in loader for target in targets]
    assert [t["image_id"] for t in together] == [t["image_id"] for t in alone]
    assert all(
        torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"]) for a, b in zip(alone, together)
    )
    # the index is memory-mapped, read-only: a worker cannot change what the others read
    assert not dataset.index.rle.flags.writeable and isinstance(dataset.index.rle, np.memmap)


def test_the_driver_prepares_both_splits_once(tiny_config):
    cfg = tiny_config()
    lines: list[str] = []
    folders = prepare_indexes(cfg.data, lines.append)
    assert set(folders) == {cfg.data.train_split, cfg.data.val_split}
    assert all((Path(folder) / "meta.json").is_file() for folder in folders.values())
    assert prepare_indexes(cfg.data, lines.append) == folders
    # the run's fingerprint is the one runs were always tagged with
    assert len(dataset_fingerprint(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))) == 16


def test_the_fingerprint_is_what_it_was(synth_root):
    """Runs already tagged with a dataset's fingerprint must still match it: same digest as the glob-based one."""
    import hashlib

    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update(annotation_path(synth_root, split).read_bytes())
        for image in sorted((synth_root / "images" / split).glob("*")):
            digest.update(f"{image.name}:{image.stat().st_size};".encode())
    assert dataset_fingerprint(synth_root, ("train", "val")) == digest.hexdigest()[:16]


def test_the_cache_beside_the_data_keeps_a_dataset_ours(tmp_path):
    """`instseg data synth --overwrite` and convert replace only folders we wrote: our index there is no stranger."""
    synthesize(tmp_path / "ours", images=8, seed=1)
    ensure_index(tmp_path / "ours", "train")
    assert (tmp_path / "ours" / INDEX_FOLDER).is_dir() and is_our_dataset(tmp_path / "ours")
