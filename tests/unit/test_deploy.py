import pytest

from instseg.errors import ConfigError
from tests.helpers import DEMO_CONFIG


def test_deployment_carries_schedule_and_parameters():
    from flows.deploy import build_deployment, make_schedule

    deployment = build_deployment(str(DEMO_CONFIG), ["train.epochs=2"], schedule=make_schedule(cron="0 3 * * *"))
    assert deployment.parameters == {"config_path": str(DEMO_CONFIG), "overrides": ["train.epochs=2"]}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *"


def test_each_kind_of_schedule_is_built():
    from flows.deploy import make_schedule

    assert make_schedule(interval_minutes=90).interval.total_seconds() == 5400
    assert make_schedule(rrule="FREQ=WEEKLY;BYDAY=SA").rrule == "FREQ=WEEKLY;BYDAY=SA"
    with pytest.raises(ConfigError, match="exactly one schedule"):
        make_schedule(cron="0 3 * * *", interval_minutes=5)
    with pytest.raises(ConfigError, match="must be positive"):
        make_schedule(interval_minutes=0)
    with pytest.raises(ConfigError, match="--cron 'not a cron': Invalid cron"):
        make_schedule(cron="not a cron")
    with pytest.raises(ConfigError, match="--rrule 'garbage'"):
        make_schedule(rrule="garbage")


def test_deploying_to_a_prefect_api_that_does_not_answer_is_one_line(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_to_pool, make_schedule
    from instseg.errors import InstsegError

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens on port 9
        with pytest.raises(InstsegError, match=r"the Prefect API at http://127.0.0.1:9/api does not answer"):
            deploy_to_pool(str(DEMO_CONFIG), schedule=make_schedule(cron="0 3 * * *"))


def test_flow_runs_on_the_given_ray_cluster_or_a_private_local_one():
    from flows.deploy import flow_on_ray
    from flows.pipeline import LocalOrClusterRayTaskRunner

    assert isinstance(flow_on_ray().task_runner, LocalOrClusterRayTaskRunner)
    assert flow_on_ray().task_runner.address is None  # RAY_ADDRESS, else a private local instance
    on_cluster = flow_on_ray("ray://head:10001").task_runner
    assert isinstance(on_cluster, LocalOrClusterRayTaskRunner) and on_cluster.address == "ray://head:10001"


def test_deployment_refuses_bad_config_and_credentials():
    from flows.deploy import deployment_parameters

    with pytest.raises(ConfigError, match="train.epochz"):
        deployment_parameters(str(DEMO_CONFIG), ["train.epochz=2"])
    with pytest.raises(ConfigError, match="holds credentials"):
        deployment_parameters(str(DEMO_CONFIG), ["tracking.uri=http://me:secret@mlflow:5000"])
