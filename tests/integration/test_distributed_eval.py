"""Sharded validation in a real 2-process gloo group equals a single-process evaluation of the same model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instseg.config import DataConfig, ModelConfig
from instseg.data.coco import CocoInstanceDataset
from instseg.data.loaders import build_loader
from instseg.engine.distributed import sharded_coco_metrics
from instseg.engine.loops import coco_metrics
from instseg.metrics.coco_eval import CocoEvaluator
from instseg.models import build_model

pytestmark = pytest.mark.integration

MODEL = ModelConfig(
    arch="tiny", weights="none", min_size=128, max_size=160, box_score_thresh=0.0, box_detections_per_img=20
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, weights: str, root: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = CocoInstanceDataset(root, "val")
        model = build_model(MODEL, dataset.label_map.num_classes)
        model.load_state_dict(torch.load(weights, weights_only=True))
        evaluator = CocoEvaluator(dataset.coco, dataset.label_map)
        metrics = sharded_coco_metrics(
            model, dataset, DataConfig(root=root, batch_size=2), torch.device("cpu"), evaluator
        )
        if rank == 0:
            torch.save(
                {"metrics": metrics, "images": sorted(evaluator.image_ids), "detections": len(evaluator.results)}, out
            )
        else:
            assert metrics is None
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_to_the_single_process_metrics(overfit_root, overfit_weights, tmp_path):
    # weights trained on these images: many detections, so the comparison compares something
    dataset = CocoInstanceDataset(overfit_root, "val")
    model = build_model(MODEL, dataset.label_map.num_classes)
    model.load_state_dict(torch.load(overfit_weights, weights_only=True))
    evaluator = CocoEvaluator(dataset.coco, dataset.label_map)
    loader = build_loader(dataset, DataConfig(root=str(overfit_root), batch_size=2), shuffle=False)
    single = coco_metrics(model, loader, torch.device("cpu"), evaluator)
    assert single["val/bbox_mar100"] > 0.3, "the model must detect the shapes for the comparison to mean anything"

    out = tmp_path / "rank0.pt"
    args = (2, _free_port(), str(overfit_weights), str(overfit_root), str(out))
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    gathered = torch.load(out, weights_only=True)
    assert gathered["images"] == sorted(dataset.image_ids), "every image once, none twice"
    assert gathered["detections"] == len(evaluator.results)
    assert gathered["metrics"] == pytest.approx(single, abs=1e-12)
