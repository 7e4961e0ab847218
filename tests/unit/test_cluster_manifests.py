"""The cluster files are run by people on machines the tests cannot reach: check what would break there. The
RayJob has the fields KubeRay's CRD requires, the runtime env of `ray job submit` (same pip list and env vars),
token auth and MLflow credentials from Secrets, checkpoints on a volume every pod mounts, and an entrypoint that
names a real module with a config that loads; the cluster launcher starts Ray with token auth."""

import importlib.util
import shlex

import yaml

from instseg.config import load
from tests.helpers import ROOT

CLUSTER = ROOT / "cluster"


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_rayjob_has_what_kuberays_crd_requires():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and _containers(head)
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in _containers(head) + [c for g in cluster["workerGroupSpecs"] for c in _containers(g)]:
        assert container["name"] and container["image"].startswith("rayproject/ray:")


def test_the_rayjob_runs_with_the_job_runtime_env_token_auth_mlflow_server_and_shared_checkpoints():
    job = _rayjob()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    submitted = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env["pip"] == submitted["pip"] and runtime_env["env_vars"] == submitted["env_vars"]
    assert "://" in runtime_env["working_dir"]  # a pod has no checkout: a zip URI
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = _containers(group)
        env = {variable["name"]: variable for variable in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        for secret in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[secret]["valueFrom"] and "value" not in env[secret]
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert mounts["shared"] == "/mnt/shared" and "persistentVolumeClaim" in volumes["shared"]


def test_the_rayjob_entrypoint_names_a_real_module_and_a_config_that_loads():
    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"] and importlib.util.find_spec(words[2]) is not None
    config = words[words.index("--config") + 1]
    overrides = [w for w in words if "=" in w]
    cfg = load(ROOT / config, overrides)
    assert cfg.ray.storage_path.startswith("/mnt/shared/") and cfg.tracking.uri is None  # from MLFLOW_TRACKING_URI


def test_the_cluster_launcher_starts_ray_with_token_auth():
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert launcher["cluster_name"] and launcher["provider"]["type"] and launcher["auth"]["ssh_user"]
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [command for command in starts if "ray start" in command]
    assert ray_starts and all("RAY_AUTH_MODE=token" in command for command in ray_starts)
