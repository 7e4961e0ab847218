"""The flow the way teams deploy it: a Prefect server started here on 127.0.0.1, `instseg flow deploy` (the
Python call behind it) creating the `process` work pool, the `gpu` global concurrency limit and a deployment
whose schedule is due within seconds, and a `prefect worker` process that picks the runs up. A second run,
started while the first holds the `gpu` slot, waits: the two studies never train at once, and both COMPLETE."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deploy import DEPLOYMENT_NAME, deploy_to_pool, make_schedule
from flows.pipeline import FLOW_NAME, GPU_LIMIT
from instseg.tracking.registry import CHAMPION, aliases
from tests.helpers import DEMO_CONFIG, ROOT, isolated_overrides
from tests.servers import free_port

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "test-pool"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def prefect_api(tmp_path):
    """A Prefect server on 127.0.0.1 with its database in tmp_path; yields the environment that reaches it."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    }
    port = url.split(":")[2].split("/")[0]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: url}):
            yield env
    finally:
        _stop(server)
        log.close()


async def _runs_and_tune_tasks() -> list[tuple[object, list]]:
    async with get_client() as client:
        runs = await client.read_flow_runs()
        found = []
        for run in runs:
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            found.append((run, [t for t in tasks if t.name.startswith("tune")]))
        return found


async def _gpu_limit() -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(GPU_LIMIT)).limit


def test_a_worker_runs_the_scheduled_flow_and_a_second_run_waits_for_the_gpu(prefect_api, synth_root, tmp_path):
    from prefect.deployments import run_deployment

    overrides = [
        *isolated_overrides(synth_root, tmp_path),
        "train.epochs=1",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tune.scheduler=none",
        "registry.model_name=worker-test",
    ]
    due = datetime.now(timezone.utc) + timedelta(seconds=3)
    deploy_to_pool(str(DEMO_CONFIG), overrides, schedule=make_schedule(interval_minutes=60, start=due), pool=POOL)
    assert asyncio.run(_gpu_limit()) == 1
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
        cwd=ROOT,
        env=prefect_api,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the scheduled run starts training
            running = [run for run, tune in asyncio.run(_runs_and_tune_tasks()) if tune and run.state.is_running()]
            if running:
                break
            time.sleep(1)
        assert running, (tmp_path / "worker.log").read_text()[-4000:]
        second = run_deployment(f"{FLOW_NAME}/{DEPLOYMENT_NAME}", timeout=0)
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            found = asyncio.run(_runs_and_tune_tasks())
            mine = [(run, tune) for run, tune in found if run.state.is_final() or run.id == second.id]
            if len(mine) >= 2 and all(run.state.is_final() for run, _ in mine):
                break
            time.sleep(2)
    finally:
        _stop(worker)
        log.close()
    output = (tmp_path / "worker.log").read_text()
    finished = [(run, tune) for run, tune in found if run.state.is_final()]
    assert len(finished) == 2 and all(run.state.is_completed() for run, _ in finished), output[-4000:]
    (scheduled,) = [(run, tune) for run, tune in finished if run.auto_scheduled]
    (waited,) = [(run, tune) for run, tune in finished if run.id == second.id]
    first_tune, second_tune = scheduled[1][0], waited[1][0]
    assert waited[0].start_time < first_tune.end_time  # the second run was up while the first trained ...
    assert second_tune.start_time >= first_tune.end_time  # ... and its study began only after the first's ended
    cfg_uri = next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]
    assert CHAMPION in aliases(cfg_uri, "worker-test")
