"""A multi-node run refuses a checkpoint folder or a sqlite tracking store that some node cannot see (the probe
itself runs on a real 3-node cluster in tests/integration/test_faults.py)."""

import pytest

import ray_jobs.shared_paths as shared_paths
from instseg.config import load, resolve_paths
from instseg.errors import ConfigError
from tests.helpers import DEMO_CONFIG


def config(tmp_path, *overrides):
    return resolve_paths(load(DEMO_CONFIG, [f"ray.storage_path={tmp_path / 'ray_results'}", *overrides]), tmp_path)


def test_the_folders_every_node_must_see(tmp_path):
    folders = shared_paths.folders_to_share(config(tmp_path, "tracking.uri=sqlite:///runs/mlflow.db"))
    assert folders == {"ray.storage_path": str(tmp_path / "ray_results"), "tracking.uri": str(tmp_path / "runs")}
    remote = config(tmp_path, "ray.storage_path=s3://bucket/runs", "tracking.uri=http://mlflow:5000")
    assert shared_paths.folders_to_share(remote) == {}
    assert shared_paths.file_store_folder("postgresql://u@db/mlflow") is None
    assert shared_paths.file_store_folder("/abs/mlruns") == "/abs/mlruns"


@pytest.fixture
def three_nodes(monkeypatch):
    nodes = [{"NodeID": f"n{i}", "NodeManagerAddress": f"10.0.0.{i}", "Alive": True} for i in range(3)]
    monkeypatch.setattr(shared_paths.ray, "nodes", lambda: nodes)


@pytest.mark.parametrize(
    "unseen, message",
    [
        ({"ray.storage_path": ["10.0.0.2"]}, "is not shared: node(s) 10.0.0.2 of this 3-node cluster cannot see it"),
        (
            {"tracking.uri": ["10.0.0.1", "10.0.0.2"]},
            "that node(s) 10.0.0.1, 10.0.0.2 cannot reach: start `instseg tracking serve`",
        ),
    ],
)
def test_a_folder_a_node_cannot_see_is_refused_in_one_line(three_nodes, monkeypatch, tmp_path, unseen, message):
    monkeypatch.setattr(shared_paths, "unseen_by_nodes", lambda folders, nodes: unseen)
    with pytest.raises(ConfigError) as refused:
        shared_paths.check_shared_paths(config(tmp_path, "tracking.uri=sqlite:///mlflow.db"))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_one_node_or_nothing_local_is_not_probed(monkeypatch, tmp_path):
    def probe(folders, nodes):
        raise AssertionError("probed")

    monkeypatch.setattr(shared_paths, "unseen_by_nodes", probe)
    monkeypatch.setattr(shared_paths.ray, "nodes", lambda: [{"NodeID": "n0", "NodeManagerAddress": "a", "Alive": True}])
    shared_paths.check_shared_paths(config(tmp_path))
