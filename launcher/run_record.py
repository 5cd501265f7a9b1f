"""What a run_dir remembers of the commands that wrote it (issue #27), in run_dir/config/: config.yaml, the resolved
config of the last writing command (file + overrides), itself a valid CONFIG, and what a later stage takes the earlier
stages' sections from (launcher/recorded_config); and runs.jsonl, one line per command with
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
STAGES_FILE = "stages.json"
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",), "train-baseline": ("baseline",), "build-ids": ("ids", "text"),
    "build-samples": ("samples",), "train": ("train", "model"), "infer": ("infer",), "evaluate": ("eval",)}
"""The config sections each pipeline stage's output depends on, in pipeline order. The root ``seed`` is no stage's:
each command may take its own (another seed for build-samples reshuffles the same data)."""
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


def stages_run(cfg, command: str) -> dict[str, tuple[str, ...]]:
    """The pipeline stages a command ran (``pipeline``: its listed ones), each with its sections."""
    names = cfg.stages if command == "pipeline" else [command]
    return {name: STAGE_SECTIONS[name] for name in names if name in STAGE_SECTIONS}


def record_run(cfg, command: str, config_path: str, overrides: list[str], started: dt.datetime,
               stage_sections: dict[str, tuple[str, ...]]) -> None:
    """Publish run_dir/config/: config.yaml (this command's resolved config), runs.jsonl (every writing command's
    line so far, this one last) and stages.json (for each stage that ever ran here, the config sections its output
    was built with, as its last run had them; ``stage_sections`` names the stages this command ran)."""
    folder = storage.join(cfg.run_dir, RECORD_DIR)
    header = (f"# recllm {command} {config_path} {' '.join(overrides)}".rstrip()
              + "\n# the resolved config this run_dir was last written with; start a later stage from it:\n"
              f"#   recllm <command> {storage.join(folder, CONFIG_FILE)} [key=value ...]\n")
    line = {"command": command, "config": config_path, "overrides": overrides,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "versions": _versions()}
    runs, stages_uri = storage.join(folder, RUNS_FILE), storage.join(folder, STAGES_FILE)
    previous = storage.read_text(runs) if storage.exists(runs) else ""
    stages = storage.read_json(stages_uri) if storage.exists(stages_uri) else {}
    resolved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # plain lists and scalars, as config.yaml has them
    for stage, sections in stage_sections.items():
        stages[stage] = {"command": command, "finished": line["finished"],
                         "sections": {name: resolved[name] for name in sections}}
    with storage.staged_folder(folder) as staged:
        staged.write_bytes(CONFIG_FILE, (header + yaml.safe_dump(to_dict(cfg), sort_keys=False)).encode())
        staged.write_bytes(RUNS_FILE, (previous + json.dumps(line) + "\n").encode())
        staged.write_bytes(STAGES_FILE, json.dumps(stages, indent=1).encode())
