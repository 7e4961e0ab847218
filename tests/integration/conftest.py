"""One private local Ray instance for the integration tests (2 CPUs, token auth)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()
