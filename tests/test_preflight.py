"""Preflight (issue #27): before any process starts, a command refuses in one line, exit 2, nothing written, what
would otherwise fail minutes later inside Ray workers or silently skew the report."""

from __future__ import annotations

import os
import time

import pytest

from launcher.cli import main
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


def _refused(capsys, argv: list[str], needle: str) -> None:
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert time.perf_counter() - start < 30  # no Ray start, no retries


def test_a_deepspeed_config_that_does_not_exist_or_parse(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _refused(capsys, ["train", DEMO, f"run_dir={run_dir}", "train.deepspeed_config=/nonexistent.json"],
             "train.deepspeed_config: '/nonexistent.json' cannot be read")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    _refused(capsys, ["plan", DEMO, f"run_dir={run_dir}", f"train.deepspeed_config={bad}"], "is not valid JSON")
    assert not run_dir.exists()


def test_more_worker_cpus_than_the_local_ray_has(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = 4 * (os.cpu_count() or 1)
    _refused(capsys, ["train", DEMO, f"run_dir={tmp_path / 'run'}", f"train.num_workers={workers}",
                      "train.cpus_per_worker=1"], f"train.num_workers: {workers} workers x 1.0 CPUs")
    assert not (tmp_path / "run").exists()


def test_a_cutoff_above_top_k(tmp_path, capsys):
    _refused(capsys, ["evaluate", DEMO, f"run_dir={tmp_path / 'run'}", "eval.ks=[1,50]", "infer.top_k=20"],
             "eval.ks: 50 above infer.top_k=20")
    _refused(capsys, ["pipeline", DEMO, f"run_dir={tmp_path / 'run'}", "eval.ks=[1,50]"], "eval.ks: 50 above")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    _refused(capsys, ["prepare", DEMO, f"run_dir={path}"], "is a file; expected a folder")
    assert path.read_text() == "x"


@pytest.mark.parametrize("command", ["prepare", "plan"])
def test_the_shipped_demo_passes_preflight(command):
    from launcher.config import load_config
    from launcher.preflight import preflight_problems

    assert preflight_problems(load_config(DEMO), command) == []
