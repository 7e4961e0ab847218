"""The team's tracking server for real: a throwaway PostgreSQL cluster (initdb / pg_ctl on 127.0.0.1) behind
`instseg tracking serve`, without and with basic auth; training, a study, registration and promotion through it."""

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from mlflow import MlflowClient

from instseg.metrics.names import FITNESS
from instseg.promotion import promote_on_split, register_run
from instseg.tracking.registry import CHAMPION, aliases
from instseg.tracking.runs import find_run
from ray_jobs.train import register_trained, run_training
from tests.helpers import DEMO_CONFIG, ROOT, files_containing, isolated_overrides
from tests.servers import PostgresCluster, TrackingServer, postgres_unavailable
from tuning.tune import run_tuning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postgres_unavailable() is not None, reason=str(postgres_unavailable())),
]
TOKEN = "XYZZY"  # the part of the admin password searched for everywhere
PASSWORD = f"adm/n@{TOKEN}?&pw"


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


def rows(backend: str, query: str) -> list[tuple]:
    with psycopg.connect(backend) as connection:
        return connection.execute(query).fetchall()


def test_training_a_study_registration_and_promotion_on_postgresql(postgres, local_ray, tiny_config, tmp_path):
    backend = postgres.create_database("team")
    server = TrackingServer(backend, tmp_path / "artifacts").wait_ready()
    try:
        settings = [f"tracking.uri={server.url}", "tracking.experiment=team", "registry.model_name=team-model"]
        cfg = tiny_config(*settings, "train.epochs=1", "run_name=pg-train")
        trained = run_training(cfg)
        assert register_trained(cfg, trained, "team-model") == "1"
        first = promote_on_split(cfg, "team-model", None, decided_by="test")
        assert first.promoted and aliases(server.url, "team-model")[CHAMPION] == "1"

        study = run_tuning(
            tiny_config(
                *settings,
                "train.epochs=2",
                "tune.num_samples=4",
                "tune.max_concurrent_trials=2",
                "tune.grace_period=1",
                "run_name=pg-study",
            )
        )
        assert len(study.trials) == 4 and all(t.run_id for t in study.trials)
        version = register_run(server.url, study.best_run_id, "team-model", tags={"source": "test"})
        second = promote_on_split(cfg, "team-model", version, decided_by="test")
        assert second.challenger_version == "2" and second.champion_version == "1" and second.record_run_id
        client = MlflowClient(server.url)
        for trial in study.trials:  # every epoch of every trial arrived once, through the server
            steps = [m.step for m in client.get_metric_history(trial.run_id, FITNESS)]
            assert steps == list(range(1, trial.epochs + 1))
        bundle = client.list_artifacts(study.best_run_id, "bundle")
        assert bundle, "artifacts travel through the server"
    finally:
        server.stop()
    # it all lives in PostgreSQL (and the artifacts in the server's folder): read the tables themselves
    names = {name for (name,) in rows(backend, "select name from runs")}
    assert {"pg-train", "pg-study"} <= names and sum(name.startswith("trial-") for name in names) == 4
    assert rows(backend, "select count(*) from model_versions where name = 'team-model'") == [(2,)]
    assert list((tmp_path / "artifacts").rglob("model.json")), "artifacts stored by the server, not the client"


def test_an_authenticated_server_refuses_strangers_and_the_password_goes_nowhere(postgres, synth_root, tmp_path):
    backend = postgres.create_database("guarded")
    server = TrackingServer(backend, tmp_path / "artifacts", auth=True, admin_password=PASSWORD).wait_ready()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        wrong = MlflowClient(f"http://admin:wrong@127.0.0.1:{server.port}")
        with pytest.raises(Exception, match="401"):
            wrong.search_experiments()

        uri = f"http://admin:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}"
        overrides = [
            *isolated_overrides(synth_root, tmp_path),
            f"tracking.uri={uri}",
            "tracking.experiment=guarded",
            "train.epochs=1",
            "run_name=guarded",
        ]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "instseg.cli",
                "train",
                "--config",
                str(DEMO_CONFIG),
                *overrides,
                "--register",
                "guarded-model",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        assert "guarded-model version 1" in output
        run = find_run(uri, "guarded", "guarded", kind="train")
        assert run.info.status == "FINISHED"
        client = MlflowClient(uri)
        assert client.get_model_version("guarded-model", "1").run_id == run.info.run_id
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    finally:
        server.stop()
    # the password: not printed (driver or server), not in params or tags, artifacts, checkpoints or the auth config
    assert TOKEN not in output and "***@127.0.0.1" in output
    assert TOKEN not in server.log.read_text()
    assert not [key for key, value in {**run.data.params, **run.data.tags}.items() if TOKEN in value]
    assert (artifacts / "bundle" / "model.json").is_file()
    assert files_containing(artifacts, TOKEN.encode()) == []
    assert files_containing(tmp_path / "ray_results", TOKEN.encode()) == []
