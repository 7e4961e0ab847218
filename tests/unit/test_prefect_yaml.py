"""prefect.yaml is read by `prefect deploy` on machines the tests do not reach: each deployment names the real
flow, a config that loads with its overrides, the work pool `instseg flow deploy` creates, and a schedule Prefect
accepts; together they show cron, interval and RRule."""

import importlib

import yaml
from prefect.schedules import Cron, Interval, RRule

from flows.deploy import WORK_POOL
from flows.pipeline import FLOW_ENTRYPOINT
from instseg.config import load
from tests.helpers import ROOT


def test_every_deployment_names_the_flow_a_config_that_loads_the_pool_and_one_schedule():
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    kinds = set()
    assert project["deployments"]
    for deployment in project["deployments"]:
        assert deployment["entrypoint"] == FLOW_ENTRYPOINT
        path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, function))
        parameters = deployment["parameters"]
        load(ROOT / parameters["config_path"], parameters["overrides"])
        assert deployment["work_pool"]["name"] == WORK_POOL and "instseg" in deployment["tags"]
        (schedule,) = deployment["schedules"]
        (kind,) = {"cron", "interval", "rrule"} & set(schedule)
        kinds.add(kind)
        build = {"cron": Cron, "interval": Interval, "rrule": RRule}[kind]
        build(schedule[kind], **({"timezone": schedule["timezone"]} if "timezone" in schedule else {}))
    assert kinds == {"cron", "interval", "rrule"}
