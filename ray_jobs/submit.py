"""Submit an entry point as a Ray job, follow its logs, and return how it ended: `instseg job submit` and
`instseg job status` (`python -m ray_jobs.submit` is an alias of the first).

    instseg job submit --address http://127.0.0.1:8265 [--runtime-env cluster/runtime_env.yaml] \
        -- python -m instseg train --config configs/demo.yaml

Clusters with token authentication (the default since Ray 2.59) need the head's token: it is read
from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when RAY_AUTH_MODE=token, or passed
as `token=`. Flows call `submit_job` and take the MLflow run id from its JobOutcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from instseg.errors import ConfigError, InstsegError, first_line
from instseg.redaction import redact, redact_tree

# The entry points print this before their summary as one JSON line, so a job's caller can read it back.
RESULT_MARKER = "instseg-result: "
_RUN_LINE = re.compile(r"(?:started|resuming) MLflow run ([0-9a-f]{32})")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobOutcome:
    job_id: str
    status: str  # SUCCEEDED | FAILED | STOPPED
    run_id: str | None  # the MLflow run the job trained into (also for failed runs that got one)
    summary: dict[str, Any] | None  # the entry point's summary (TrainSummary / TuneSummary as a dict)
    message: str | None = None  # Ray's reason for a failed or stopped job

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def print_result(summary: dict[str, Any]) -> None:
    """Entry points: the summary as the one line submit_job reads back (credentials redacted)."""
    print(RESULT_MARKER + json.dumps(redact_tree(summary), default=str), flush=True)


def parse_logs(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """(MLflow run id, summary) from a job's logs; the last of each wins."""
    run_ids = _RUN_LINE.findall(text)
    summary = None
    for line in text.splitlines():
        if line.startswith(RESULT_MARKER):
            summary = json.loads(line[len(RESULT_MARKER) :])
    run_id = (summary or {}).get("run_id") or (summary or {}).get("parent_run_id") or (run_ids[-1] if run_ids else None)
    return run_id, summary


def load_runtime_env(path: str | None, working_dir: str | None) -> dict[str, Any]:
    """A runtime_env YAML (cluster/runtime_env.yaml) with working_dir resolved against the caller's cwd."""
    env: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"runtime env file not found: {file}")
        env = yaml.safe_load(file.read_text()) or {}
        if not isinstance(env, dict):
            raise ConfigError(f"{file}: a runtime env must be a mapping")
    if working_dir is not None:
        env["working_dir"] = working_dir
    if "working_dir" in env and "://" not in str(env["working_dir"]):
        env["working_dir"] = str(Path(env["working_dir"]).resolve())
    return env


def submit_job(
    entrypoint: Sequence[str] | str,
    *,
    address: str,
    runtime_env: dict[str, Any] | None = None,
    token: str | None = None,
    on_line: Callable[[str], None] | None = print,
    poll_s: float = 1.0,
    agent_wait_s: float = 120.0,
) -> JobOutcome:
    """Submit `entrypoint`, stream its log lines to `on_line` (None: quiet) and wait for the end.
    A head whose job agent is still starting is retried for up to `agent_wait_s`."""
    from ray.job_submission import JobSubmissionClient

    command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            client = JobSubmissionClient(address, headers=headers)
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env or {})
            break
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            # a head that has just started answers before its job agent is up
            if "No available agent" in reason and time.monotonic() < deadline:
                time.sleep(poll_s)
                continue
            raise JobSubmitError(f"could not submit to {redact(address)}: {redact(reason)}") from exc
    if on_line is not None:
        on_line(f"submitted job {job_id} to {redact(address)}")
        asyncio.run(_follow(client, job_id, on_line))
    while (status := str(client.get_job_status(job_id))) not in TERMINAL:
        time.sleep(poll_s)
    run_id, summary = parse_logs(client.get_job_logs(job_id))
    message = client.get_job_info(job_id).message if status != "SUCCEEDED" else None
    return JobOutcome(job_id=job_id, status=status, run_id=run_id, summary=summary, message=message)


async def _follow(client: Any, job_id: str, on_line: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            on_line(line)


class JobSubmitError(InstsegError):
    exit_code = 1


def submit_command(args: argparse.Namespace) -> int:
    """`instseg job submit`: exit 0 when the job succeeded, 1 when it failed or was stopped."""
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        raise ConfigError("job submit: give the command to run after --, e.g. -- python -m instseg train --config ...")
    outcome = submit_job(
        entrypoint, address=args.address, runtime_env=load_runtime_env(args.runtime_env, args.working_dir)
    )
    print(json.dumps(redact_tree(outcome.to_dict()), indent=2, default=str))
    return 0 if outcome.succeeded else 1


def status_command(args: argparse.Namespace) -> int:
    """`instseg job status ID`: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, and Ray's message if any."""
    from ray.job_submission import JobSubmissionClient

    try:
        info = JobSubmissionClient(args.address).get_job_info(args.job_id)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobSubmitError(f"job {args.job_id} at {redact(args.address)}: {redact(first_line(exc, 300))}") from exc
    message = f": {info.message}" if info.message else ""
    print(f"{args.job_id} {info.status}{message}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ray_jobs.submit ARGS` = `instseg job submit ARGS`."""
    from instseg.cli import parse_command

    return submit_command(parse_command(["job", "submit"], argv))


if __name__ == "__main__":
    from ray_jobs.cli_common import run_cli

    sys.exit(run_cli(main))
