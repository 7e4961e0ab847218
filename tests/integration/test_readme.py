"""The README runs as written: every shell block of its "What you can run" and "On a Ray cluster" sections,
verbatim, in a copy of the project (so nothing lands in the checkout), the cluster one against the
token-authenticated head it starts itself on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTIONS = ("What you can run", "On a Ray cluster")
# what the copy leaves out: what runtime_env and .gitignore leave out, and this machine's own state
NOT_COPIED = (
    ".git",
    ".venv",
    ".device",
    "data",
    "mlruns",
    "mlartifacts",
    "ray_results",
    "*.db",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
)
RAY_DEFAULT_PORTS = (6379, 8265)  # `ray start --head` as the README writes it: GCS and dashboard


def shell_blocks(readme: str, section: str) -> list[str]:
    """The ```bash blocks of one `## section` of the README."""
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run_block(block: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README block failed ({done.returncode}):\n{block}\n--- output ---\n{output[-6000:]}"
    return output


def test_the_readme_shell_examples_run_as_written(tmp_path):
    import ray

    from ray_jobs.runtime import start_local_ray

    readme = (ROOT / "README.md").read_text()
    blocks = {section: shell_blocks(readme, section) for section in SECTIONS}
    assert all(blocks.values()), f"no shell block in a section: {blocks}"
    # the session's own local Ray goes away first: `ray stop` at the end of the cluster block stops every Ray
    # process of this machine, and the head must get the default ports the README's commands use
    session_ray = ray.is_initialized()
    ray.shutdown()
    busy = [port for port in RAY_DEFAULT_PORTS if port_in_use(port)]
    if busy:
        pytest.skip(f"127.0.0.1 ports {busy} are taken by another process: the README's `ray start --head` needs them")
    project = tmp_path / "instseg"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(*NOT_COPIED))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_AUTH_MODE", None)  # the cluster block sets it as a user's shell would
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        for block in blocks["What you can run"]:
            run_block(block, project, env)
        cluster_output = "".join(run_block(block, project, env) for block in blocks["On a Ray cluster"])
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop"], capture_output=True, timeout=120)
        if session_ray:
            start_local_ray(num_cpus=2)

    # what the daily loop wrote, where the README says
    for written in ("val/metrics.json", "preds.json", "metrics/metrics.json", "mlflow.db"):
        assert (project / written).is_file(), written
    assert len(list((project / "drawn").glob("*.png"))) == len(list((project / "data/synth/images/val").glob("*.jpg")))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = client.search_model_versions("name='demo'")
    # one version from `train --register` on this machine, one from the job that registered on the cluster
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert str(client.get_registered_model("demo").aliases["champion"]) == "1"
    assert "SUCCEEDED" in cluster_output and '"status": "SUCCEEDED"' in cluster_output
    # both jobs kept their checkpoints beside the project, not in the job's temporary copy
    assert len(list((project / "ray_results").glob("*/results.csv"))) == 3  # the local run and the two jobs
