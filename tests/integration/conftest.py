"""Ray for the integration tests: a private local instance (2 CPUs, token auth), and the token that
clusters started by hand (multi-node, job submission) need before their first process starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from instseg.data.synth import synthesize


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from ray_jobs.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2)  # as `instseg train` starts it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def longer_epochs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 training images: an epoch of the tiny model lasts a few seconds, long enough to hit its middle."""
    root = tmp_path_factory.mktemp("faults") / "synth40"
    synthesize(root, images=40, seed=1)
    return root
