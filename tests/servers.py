"""Throwaway servers on 127.0.0.1 for tests and benches: a PostgreSQL cluster (initdb in a temp dir, run as the
`postgres` user: PostgreSQL refuses root) and `instseg tracking serve` in front of it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

POSTGRES_BIN = Path(os.environ.get("INSTSEG_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_unavailable() -> str | None:
    """Why a throwaway PostgreSQL cluster cannot be made here (None when it can)."""
    if not (POSTGRES_BIN / "initdb").exists():
        return f"PostgreSQL's initdb is not installed ({POSTGRES_BIN}/initdb; Debian: postgresql-15)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


class PostgresCluster:
    """initdb + pg_ctl on 127.0.0.1 and a free port, trust auth for user `mlflow`, no fsync (throwaway)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="instseg-pg-"))
        self.port = free_port()
        self.data = self.folder / "data"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> "PostgresCluster":
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(str(POSTGRES_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "mlflow", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder} -c fsync=off"
        self._run(
            str(POSTGRES_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "postgres.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        return self

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URI."""
        self._run(str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", name)
        return f"postgresql://mlflow@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class TrackingServer:
    """`instseg tracking serve` on 127.0.0.1, its output in a log file; stop() ends its whole process group."""

    def __init__(
        self, backend: str, artifacts: Path, auth: bool = False, admin_password: str | None = None, workers: int = 2
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = artifacts.parent / f"tracking-server-{self.port}.log"
        env = {key: value for key, value in os.environ.items() if key != "MLFLOW_AUTH_ADMIN_PASSWORD"}
        if admin_password is not None:
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password
        command = [
            sys.executable,
            "-m",
            "instseg.cli",
            "tracking",
            "serve",
            "--backend",
            backend,
            "--artifacts",
            str(artifacts),
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            *(["--auth"] if auth else []),
        ]
        artifacts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> "TrackingServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the tracking server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except urllib.error.HTTPError:
                return self  # it answers (the auth app guards /health too)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the tracking server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group a server started with start_new_session=True; SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
