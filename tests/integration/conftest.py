"""Ray for the integration tests: a private local instance (2 CPUs, token auth), and the token that
clusters started by hand (multi-node, job submission) need before their first process starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instseg.data.synth import synthesize

RAY_CLI = str(Path(sys.executable).parent / "ray")


def ensure_auth_token() -> str:
    """The token in $HOME/.ray/auth_token (HOME is a temp dir in tests), created on first use."""
    done = subprocess.run([RAY_CLI, "get-auth-token", "--generate"], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


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
