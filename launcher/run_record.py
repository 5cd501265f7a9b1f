"""What a run_dir remembers of the commands that wrote it (issue #27), in run_dir/config/: config.yaml, the resolved
config of the last writing command (file + overrides), itself a valid CONFIG, so a later stage starts from it without
retyping a single override (`recllm evaluate RUN_DIR/config/config.yaml`); and runs.jsonl, one line per command with
what produced it: the command, the config file and overrides, the git commit and the package versions. The folder
is published whole like every stage output, so a kill never leaves half a record.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from data_pipeline import storage
from data_pipeline.config_schema import to_dict

RECORD_DIR = "config"
CONFIG_FILE = "config.yaml"
RUNS_FILE = "runs.jsonl"
PACKAGES = ("recllm", "torch", "transformers", "peft", "deepspeed", "ray", "pyarrow")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def record_run(cfg, command: str, config_path: str, overrides: list[str], started: dt.datetime) -> None:
    """Publish run_dir/config/: config.yaml (this command's resolved config) and runs.jsonl (every writing
    command's line so far, this one last)."""
    folder = storage.join(cfg.run_dir, RECORD_DIR)
    header = (f"# recllm {command} {config_path} {' '.join(overrides)}".rstrip()
              + "\n# the resolved config this run_dir was last written with; start a later stage from it:\n"
              f"#   recllm <command> {storage.join(folder, CONFIG_FILE)} [key=value ...]\n")
    line = {"command": command, "config": config_path, "overrides": overrides,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "versions": _versions()}
    runs = storage.join(folder, RUNS_FILE)
    previous = storage.read_text(runs) if storage.exists(runs) else ""
    with storage.staged_folder(folder) as staged:
        staged.write_bytes(CONFIG_FILE, (header + yaml.safe_dump(to_dict(cfg), sort_keys=False)).encode())
        staged.write_bytes(RUNS_FILE, (previous + json.dumps(line) + "\n").encode())
