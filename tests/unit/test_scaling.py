"""What each Train worker reserves: the linear LR rule over the global batch, GPUs shared through fractional
gpus_per_worker, SyncBatchNorm only with GPUs."""

import pytest
import torch

from instseg.config import load
from instseg.errors import ConfigError
from tests.helpers import DEMO_CONFIG

CPU = torch.device("cpu")


def test_learning_rate_scales_linearly_with_the_global_batch():
    cfg = load(DEMO_CONFIG, ["train.lr=0.02", "data.batch_size=4", "ray.num_workers=4"])
    assert cfg.global_batch() == 16 and cfg.effective_lr() == pytest.approx(0.08)
    cfg = load(DEMO_CONFIG, ["train.lr=0.02", "data.batch_size=2", "ray.num_workers=8", "train.lr_reference_batch=16"])
    assert cfg.effective_lr() == pytest.approx(0.02)  # torchvision's recipe: 0.02 for 8 GPUs x 2 images


def test_sync_batchnorm_without_gpus_is_a_config_error():
    with pytest.raises(ConfigError, match="model.sync_batchnorm needs ray.use_gpu=true"):
        load(DEMO_CONFIG, ["model.sync_batchnorm=true"])


def test_trials_share_a_gpu_through_fractional_gpus_per_worker():
    from ray_jobs.trainer import scaling_config

    cfg = load(DEMO_CONFIG, ["ray.use_gpu=true", "ray.gpus_per_worker=0.25", "ray.cpus_per_worker=2"])
    scaling = scaling_config(cfg)
    assert scaling.use_gpu and scaling.num_workers == 1
    assert scaling.resources_per_worker == {"CPU": 2.0, "GPU": 0.25}
    assert scaling_config(load(DEMO_CONFIG, [])).resources_per_worker == {"CPU": 0.9}, "no GPU asked for on CPU"
    with pytest.raises(ConfigError, match=r"gpus_per_worker=0.5 puts several workers on one GPU"):
        load(DEMO_CONFIG, ["ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.num_workers=2"])
    with pytest.raises(ConfigError, match="ray.gpus_per_worker"):
        load(DEMO_CONFIG, ["ray.gpus_per_worker=2"])
