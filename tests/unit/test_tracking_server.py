"""`instseg tracking serve` refuses what cannot work in one line and keeps secrets out of argv and files (the real
server runs in tests/integration/test_team_tracking.py)."""

import pytest

from instseg.cli import main as cli_main
from instseg.errors import ConfigError
from instseg.tracking.server import auth_config, check_backend, serve, server_command


@pytest.mark.parametrize("backend", ["mysql://u@h/db", "mlflow.db", "http://127.0.0.1:5000"])
def test_a_backend_that_is_not_postgresql_or_sqlite_is_refused(backend):
    with pytest.raises(ConfigError, match="expected postgresql://USER@HOST:PORT/DB"):
        check_backend(backend)


def test_a_database_that_does_not_answer_is_named_without_its_password(capsys):
    code = cli_main(
        ["tracking", "serve", "--backend", "postgresql://mlflow:S3CRET@127.0.0.1:1/mlflow", "--artifacts", "unused"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not answer" in err and "S3CRET" not in err and len(err.strip().splitlines()) == 1


def test_auth_needs_the_admin_password_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        serve(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), "127.0.0.1", 5000, auth=True)


def test_no_secret_in_the_command_line_or_the_auth_settings(tmp_path):
    backend = "postgresql://mlflow:S3CRET@db:5432/mlflow"
    command = server_command(backend, "/mnt/shared/artifacts", "0.0.0.0", 5000, 2, auth=True)
    assert "S3CRET" not in " ".join(command) and command[-2:] == ["--app-name", "basic-auth"]
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    settings = auth_config(backend, tmp_path).read_text()
    assert "admin_password" not in settings and f"database_uri = {backend}" in settings
    assert (tmp_path / "basic_auth.ini").stat().st_mode & 0o077 == 0  # the database password: owner only


def test_an_artifact_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    taken = tmp_path / "artifacts"
    taken.write_text("not a folder")
    code = cli_main(
        ["tracking", "serve", "--backend", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts", str(taken)]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"--artifacts {taken}: cannot use it as the artifact folder" in err
    assert len(err.strip().splitlines()) == 1 and taken.read_text() == "not a folder"
