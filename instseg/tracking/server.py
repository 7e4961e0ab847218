"""`instseg tracking serve`: the MLflow tracking server a team shares.

    MLFLOW_AUTH_ADMIN_PASSWORD=... instseg tracking serve --backend postgresql://mlflow@db:5432/mlflow \
        --artifacts /mnt/shared/mlartifacts --host 0.0.0.0 --auth

Runs and the registry live in the backend store (PostgreSQL: many writers on many machines; sqlite only for one
machine); artifacts go through the server to --artifacts (proxied: clients need no storage credentials). With
--auth, MLflow's basic-auth app guards every request; its users live in the same database, and the admin's
first password comes from MLFLOW_AUTH_ADMIN_PASSWORD, never from the command line (which `ps` shows to anyone).
Clients pass credentials in the tracking URI (http://user:password@host:5000) or in MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD; instseg never prints, logs or stores them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from instseg.errors import ConfigError, first_line
from instseg.redaction import redact

ADMIN_PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"  # read by MLflow's auth app when it creates the admin
AUTH_CONFIG_VARIABLE = "MLFLOW_AUTH_CONFIG_PATH"
SECRET_KEY_VARIABLE = "MLFLOW_FLASK_SERVER_SECRET_KEY"
JOB_EXECUTION_VARIABLE = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
BACKENDS = ("postgresql", "sqlite")
CONNECT_TIMEOUT_S = 10


def check_backend(backend: str) -> None:
    """ConfigError unless `backend` is a PostgreSQL or sqlite URI whose database answers now."""
    scheme = backend.split("://", 1)[0].split("+", 1)[0]
    if "://" not in backend or scheme not in BACKENDS:
        raise ConfigError(
            f"--backend {redact(backend)}: expected postgresql://USER@HOST:PORT/DB (many machines) or "
            "sqlite:////absolute/path.db (one machine)"
        )
    import sqlalchemy

    options = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if scheme == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(backend, **options)
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 (driver errors differ; all mean the store cannot be used)
        raise ConfigError(f"--backend {redact(backend)} does not answer: {redact(first_line(exc, 300))}") from None


def auth_config(backend: str, folder: Path) -> Path:
    """The basic-auth app's settings: its users in the backend's database; every request needs a user, and each
    user the admin creates may log runs and register models (default_permission EDIT). No password in it."""
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = EDIT\n"
        f"database_uri = {backend}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.chmod(0o600)  # the backend URI may hold the database's password
    return path


def server_command(backend: str, artifacts: str, host: str, port: int, workers: int, auth: bool) -> list[str]:
    """The `mlflow server` command line (without secrets: the backend URI travels by environment, see serve)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
    ]
    return [*command, "--app-name", "basic-auth"] if auth else command


def serve(backend: str, artifacts: str, host: str, port: int, workers: int = 2, auth: bool = False) -> int:
    """Run the server in the foreground until it exits or is stopped (Ctrl-C / SIGTERM stop it cleanly)."""
    check_backend(backend)
    if auth and not os.environ.get(ADMIN_PASSWORD_VARIABLE):
        raise ConfigError(
            f"--auth needs the admin's password in {ADMIN_PASSWORD_VARIABLE} (used when the admin user is first "
            "created; never on the command line, where `ps` shows it)"
        )
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
        try:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file, a path under a file, no permission
            raise ConfigError(
                f"--artifacts {artifacts}: cannot use it as the artifact folder ({first_line(exc)})"
            ) from None
    folder = Path(tempfile.mkdtemp(prefix="instseg-tracking-"))
    # the backend URI may carry a password: by environment, not in argv (MLflow reads MLFLOW_BACKEND_STORE_URI)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend}
    # MLflow's job runner (seven huey consumer processes, ~250 MB each) serves GenAI features instseg does not use
    env.setdefault(JOB_EXECUTION_VARIABLE, "false")
    if auth:
        env[AUTH_CONFIG_VARIABLE] = str(auth_config(backend, folder))
        # the auth app's CSRF key: one per server start unless the operator pins one (several servers behind a
        # load balancer need the same)
        env.setdefault(SECRET_KEY_VARIABLE, secrets.token_urlsafe(32))
    command = server_command(backend, artifacts, host, port, workers, auth)
    print(
        f"MLflow server on http://{host}:{port}: backend {redact(backend)}, artifacts {redact(artifacts)}"
        f"{', basic auth' if auth else ''}",
        flush=True,
    )
    server = subprocess.Popen(command, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: server.terminate())
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(folder, ignore_errors=True)


def serve_command(args: argparse.Namespace) -> int:
    return serve(args.backend, args.artifacts, args.host, args.port, args.workers, args.auth)
