import pytest

from instseg.errors import ConfigError
from tests.conftest import DEMO_CONFIG


def test_deployment_carries_schedule_and_parameters():
    from flows.deploy import build_deployment

    deployment = build_deployment(str(DEMO_CONFIG), ["train.epochs=2"], cron="0 3 * * *")
    assert deployment.parameters == {"config_path": str(DEMO_CONFIG), "overrides": ["train.epochs=2"]}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *"


def test_flow_runs_on_the_given_ray_cluster_or_a_private_local_one(monkeypatch):
    from flows.deploy import flow_on_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert flow_on_ray("ray://head:10001").task_runner.address == "ray://head:10001"
    assert flow_on_ray().task_runner.address == "local"


def test_deployment_refuses_bad_config_and_missing_schedule():
    from flows.deploy import build_deployment

    with pytest.raises(ConfigError, match="train.epochz"):
        build_deployment(str(DEMO_CONFIG), ["train.epochz=2"], cron="0 3 * * *")
    with pytest.raises(ConfigError, match="exactly one schedule"):
        build_deployment(str(DEMO_CONFIG))
