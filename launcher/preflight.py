"""Checks a command makes before any process starts (issue #27): what would otherwise fail minutes later inside Ray
workers, or silently skew a report. Each problem is one line naming the field; the CLI exits 2 and writes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINS = {"train", "plan"}
EVALUATES = {"evaluate"}


def _stages(cfg, command: str) -> set[str]:
    return set(cfg.stages) if command == "pipeline" else {command}


def deepspeed_config_path(deepspeed_config: str) -> Path:
    """Where the trainer reads it: relative to the repository first, then to the working directory."""
    path = Path(deepspeed_config)
    if path.is_absolute():
        return path
    return REPO / path if (REPO / path).exists() else path.resolve()


def preflight_problems(cfg, command: str) -> list[str]:
    stages, problems = _stages(cfg, command), []
    run_dir = cfg.run_dir
    if "://" not in run_dir and os.path.exists(run_dir) and not os.path.isdir(run_dir):
        problems.append(f"run_dir: {run_dir!r} is a file; expected a folder (or a path that does not exist yet)")
    if stages & TRAINS:
        path = deepspeed_config_path(cfg.train.deepspeed_config)
        try:
            json.loads(path.read_text())
        except OSError as exc:
            problems.append(f"train.deepspeed_config: {cfg.train.deepspeed_config!r} cannot be read "
                            f"({exc.strerror or exc})")
        except json.JSONDecodeError as exc:
            problems.append(f"train.deepspeed_config: {path} is not valid JSON (line {exc.lineno}: {exc.msg})")
    if "train" in stages and not cfg.train.use_gpu and not os.environ.get("RAY_ADDRESS"):
        wanted, have = cfg.train.num_workers * cfg.train.cpus_per_worker, os.cpu_count() or 1
        if wanted > have:
            problems.append(f"train.num_workers: {cfg.train.num_workers} workers x {cfg.train.cpus_per_worker} CPUs "
                            f"= {wanted:g} CPUs, but the local Ray this run starts has {have}; lower "
                            "train.num_workers or train.cpus_per_worker, or set RAY_ADDRESS to a cluster")
    if stages & EVALUATES and max(cfg.eval.ks) > cfg.infer.top_k:
        problems.append(f"eval.ks: {max(cfg.eval.ks)} above infer.top_k={cfg.infer.top_k}: the top-K lists hold "
                        f"{cfg.infer.top_k} items, so HR@{max(cfg.eval.ks)} would be HR@{cfg.infer.top_k}; raise "
                        "infer.top_k or drop that K")
    return problems
