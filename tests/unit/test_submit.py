"""The job helper (ray_jobs.submit): the run id and summary from a job's logs, the runtime env file."""

import json

import pytest

from instseg.errors import ConfigError
from ray_jobs.submit import RESULT_MARKER, load_runtime_env, parse_logs


def test_job_logs_give_the_run_id_and_the_summary():
    logs = (
        "started MLflow run "
        + "a" * 32
        + " 'x'\nepoch 1/1 ...\n"
        + RESULT_MARKER
        + json.dumps({"run_id": "b" * 32, "metrics": {}})
        + "\n"
    )
    assert parse_logs(logs) == ("b" * 32, {"run_id": "b" * 32, "metrics": {}})
    assert parse_logs("resuming MLflow run " + "c" * 32 + " 'x'\nTraceback ...") == ("c" * 32, None)  # a failed job
    assert parse_logs("nothing") == (None, None)


def test_runtime_env_file_gets_an_absolute_working_dir(tmp_path, monkeypatch):
    (tmp_path / "env.yaml").write_text("working_dir: .\nexcludes: [data]\n")
    monkeypatch.chdir(tmp_path)
    assert load_runtime_env("env.yaml", None) == {"working_dir": str(tmp_path), "excludes": ["data"]}
    with pytest.raises(ConfigError, match="runtime env file not found"):
        load_runtime_env("missing.yaml", None)
