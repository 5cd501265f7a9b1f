"""`recllm submit`: the one module that speaks to Ray Jobs. Turns a locally validated config (the pipeline or one
stage) into a job submission: an entrypoint that runs the same `recllm` command on the cluster, a runtime_env that
ships this repo as the job's working_dir, and metadata. Sends it to the cluster's dashboard with the cluster token,
refusing an open cluster across a network, streams the job's logs and returns its final status.
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from data_pipeline.config_schema import ConfigError

REPO = Path(__file__).resolve().parents[1]

WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", ".torch_extensions", "__pycache__", "*.pyc", ".pytest_cache",
                        ".hypothesis", "*.egg-info", "build", "dist", "/.whl", "/.gl"]
"""What never travels to the cluster: environments, outputs, caches, build artefacts."""

JOB_ENV_VARS = {
    "PYTHONUNBUFFERED": "1",  # logs reach `tail_job_logs` as they are written
    "TOKENIZERS_PARALLELISM": "false",
    # `recllm train` calls ray.init(runtime_env={"env_vars": ...}) for its workers; Ray refuses to merge that with
    # the job's env_vars when a key appears in both unless the driver is allowed to override.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}


@dataclass
class JobSubmission:
    """Everything sent to Ray Jobs, exactly as `JobSubmissionClient.submit_job` receives it."""

    address: str | None
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    submission_id: str

    def as_dict(self) -> dict:
        return asdict(self)


def pinned_requirements(repo: Path = REPO) -> list[str]:
    """The pins of requirements.txt, for a cluster image that lacks them (`--install-requirements`)."""
    lines = (repo / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _paths_that_travel(cfg, config_path: Path, repo: Path) -> list[str]:
    """The job runs in a copy of the repo on the cluster: relative paths resolve there, and the copy is temporary."""
    problems = []
    if not config_path.is_relative_to(repo):
        problems.append(f"config: {str(config_path)!r} is outside the repo {repo}; only the repo travels to the "
                        f"cluster, so put the config under it (e.g. configs/)")
    if "://" not in cfg.run_dir and not Path(cfg.run_dir).is_absolute():
        problems.append(f"run_dir: {cfg.run_dir!r} is relative; on the cluster it would land in the job's temporary "
                        f"copy of the repo; expected an absolute path on shared storage or s3://...")
    data_path = cfg.data.path
    if data_path and "://" not in data_path and not Path(data_path).is_absolute() and not (repo / data_path).exists():
        problems.append(f"data.path: {data_path!r} is relative and not under the repo {repo}, where the job looks "
                        f"for it; expected a path inside the repo, an absolute path on shared storage, or s3://...")
    return problems


def _env_vars(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    env, problems = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"--env {pair!r}: expected KEY=VALUE")
        else:
            env[key] = value
    return env, problems


def build_submission(config: str, overrides: list[str], *, stage: str = "pipeline", address: str | None = None,
                     install_requirements: bool = False, env: list[str] | None = None,
                     submission_id: str | None = None, repo: Path = REPO) -> JobSubmission:
    """Validate the config here (raising one ConfigError with every problem), then describe the job."""
    from launcher.config import load_config

    cfg = load_config(config, overrides)
    config_path = Path(config).resolve()
    extra_env, problems = _env_vars(env or [])
    problems += _paths_that_travel(cfg, config_path, repo)
    if problems:
        raise ConfigError(problems, config)
    config_in_repo = config_path.relative_to(repo).as_posix()
    # `python -m` runs the working_dir's copy of recllm even where the console script is not installed.
    entrypoint = shlex.join(["python", "-m", "launcher.cli", stage, config_in_repo, *overrides])
    runtime_env: dict = {"working_dir": str(repo), "excludes": list(WORKING_DIR_EXCLUDES),
                         "env_vars": {**JOB_ENV_VARS, **extra_env}}
    if install_requirements:
        runtime_env["pip"] = {"packages": pinned_requirements(repo), "pip_check": False}
    commit = _git(repo, "rev-parse", "HEAD")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    metadata = {"recllm_command": stage, "recllm_config": config_in_repo, "recllm_overrides": json.dumps(overrides),
                "recllm_run_dir": cfg.run_dir, "recllm_git_commit": commit or "unknown",
                "recllm_git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
                "submitted_by": getpass.getuser()}
    submission_id = submission_id or f"recllm-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return JobSubmission(address, entrypoint, runtime_env, metadata, submission_id)


def use_cluster_token() -> bool:
    """Send the cluster token when there is one (RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file or ~/.ray/auth_token),
    as Ray's own clients read it; True when a token will be sent."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not (os.environ.get("RAY_AUTH_TOKEN") or (token_file.is_file() and token_file.stat().st_size)):
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    return os.environ["RAY_AUTH_MODE"] == "token"


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def open_cluster_refusal(address: str, has_token: bool) -> str | None:
    """Why a job must not go to ``address`` as asked, or None. Plain http to another machine is refused either way:
    with a token, the bearer token would cross the network in clear; without one, the cluster runs jobs from anyone
    who can reach it (or this client will be refused anyway)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme == "https" or _is_loopback(parts.hostname):
        return None
    if has_token:
        return (f"refusing plain http to {address}: the cluster token would cross the network in clear; put https in "
                f"front of the dashboard, tunnel to 127.0.0.1 (ssh -L 8265:127.0.0.1:8265 HEAD), or pass --insecure")
    return (f"refusing plain http to {address} without a cluster token: a cluster that takes this job takes anyone's "
            f"on the network; set RAY_AUTH_TOKEN or copy the head's token to ~/.ray/auth_token (README: Token auth), "
            f"tunnel to 127.0.0.1, or pass --insecure")


async def _print_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def final_status(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's terminal status; the log stream can close a moment before the status is written."""
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    return status.value


def run_submission(job: JobSubmission) -> int:
    """Submit, stream the logs until the job ends, and return 0 if it SUCCEEDED, 1 otherwise."""
    has_token = use_cluster_token()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(job.address)
        job_id = client.submit_job(entrypoint=job.entrypoint, runtime_env=job.runtime_env, metadata=job.metadata,
                                   submission_id=job.submission_id)
    except ConnectionError as exc:
        print(f"recllm submit: error: no Ray cluster answers at {job.address}: {exc}", file=sys.stderr)
        return 1
    except AuthenticationError:
        why = "refused the token sent" if has_token else "needs a token and none was found"
        print(f"recllm submit: error: the Ray cluster at {job.address} {why}; set RAY_AUTH_TOKEN or copy the head's "
              f"token to ~/.ray/auth_token (README: Token auth)", file=sys.stderr)
        return 2
    print(f"recllm submit: job {job_id} submitted to {job.address}", flush=True)
    try:
        asyncio.run(_print_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nrecllm submit: job {job_id} keeps running; stop it with: ray job stop {job_id} "
              f"--address {job.address}", file=sys.stderr)
        return 130
    status = final_status(client, job_id)
    print(f"recllm submit: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
