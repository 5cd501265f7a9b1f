"""run_dir/.lock: a second writer exits 2 naming the holder (local disk and s3:// on moto's server); a stale lock is
broken only with --break-lock; the lock goes away when the writer ends, fails or is sent SIGTERM; readers and the
pipeline's own stages are not blocked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipeline import run_lock
from launcher.cli import main
from tests.conftest import REPO
from tests.test_s3 import s3_endpoint  # noqa: F401 - the moto server fixture

CONFIG = str(REPO / "configs" / "alignment_sft.yaml")
SEQUENCES = {str(u): [(u + k) % 12 for k in range(5)] for u in range(30)}


@pytest.fixture()
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "Toy.inter.json").write_text(json.dumps(SEQUENCES))
    return folder


def _prepare(raw, run_dir, *flags):
    return main(["prepare", CONFIG, f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy", *flags])


def _hold_in_another_process(run_dir) -> subprocess.Popen:
    """A second process that takes the lock as the CLI does and keeps it until killed."""
    code = ("import sys, time; from data_pipeline.run_lock import acquire; acquire(sys.argv[1], 'build-ids'); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recllm ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_second_writer_exits_2_naming_the_holder_then_breaks_the_lock_once_its_process_is_gone(raw, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold_in_another_process(run_dir)
    try:
        assert _prepare(raw, run_dir) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"recllm prepare: error: {run_dir / '.lock'}: run_dir is locked by stage build-ids, "
                               f"pid {holder.pid} on host {socket.gethostname()} since ")
        assert "wait for it" in line
        assert _prepare(raw, run_dir, "--break-lock") == 2  # its process is alive: --break-lock does not steal it
        assert not (run_dir / "dataset").exists()
        assert main(["plan", CONFIG, f"run_dir={run_dir}"]) == 0  # readers do not need the lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid  # SIGKILL leaves it behind
    capsys.readouterr()
    assert _prepare(raw, run_dir) == 2
    assert "it is stale (its process is gone): rerun with --break-lock" in _one_error_line(capsys)
    assert _prepare(raw, run_dir, "--break-lock") == 0
    assert (run_dir / "dataset" / "manifest.json").is_file() and not (run_dir / ".lock").exists()


def test_a_lock_from_another_host_is_broken_only_when_older_than_the_configured_age(raw, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = {"host": "gpu-node-7", "pid": 4242, "stage": "train", "started": "2026-01-01T00:00:00Z",
            "started_unix": time.time() - 3 * 3600, "nonce": "x"}
    (run_dir / ".lock").write_text(json.dumps(lock))
    assert _prepare(raw, run_dir, "--break-lock") == 2  # 3 h old, default age 24 h: its pid cannot be checked here
    assert "locked by stage train, pid 4242 on host gpu-node-7" in _one_error_line(capsys)
    assert _prepare(raw, run_dir, "lock_max_age_hours=2") == 2
    assert "it is stale (older than 2 h): rerun with --break-lock" in _one_error_line(capsys)
    assert _prepare(raw, run_dir, "lock_max_age_hours=2", "--break-lock") == 0
    assert not (run_dir / ".lock").exists()


def test_lock_is_released_when_the_stage_fails_and_the_pipeline_takes_it_once(raw, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["build-ids", CONFIG, f"run_dir={run_dir}"]) == 2  # no dataset/ yet
    assert "manifest.json" in _one_error_line(capsys)
    assert not (run_dir / ".lock").exists()
    assert main(["pipeline", CONFIG, f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy",
                 "stages=[prepare,build-ids]", "ids.scheme=atomic"]) == 0
    assert (run_dir / "item_ids" / "tokens.json").is_file() and not (run_dir / ".lock").exists()


def test_sigterm_releases_the_lock(raw, tmp_path):
    run_dir, stderr_file = tmp_path / "run", tmp_path / "stderr.txt"
    assert _prepare(raw, run_dir) == 0
    # A real writer that runs for a while: train-baseline training SASRec for many epochs.
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train-baseline", CONFIG, f"run_dir={run_dir}",
                             "baseline.epochs=100000", "baseline.patience=100000"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=stderr_file.open("w"))  # a file: a pipe nobody reads fills and blocks it
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / ".lock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, stderr_file.read_text()[-2000:]
            time.sleep(0.2)
        assert json.loads((run_dir / ".lock").read_text())["stage"] == "train-baseline"
        time.sleep(1)
        # Still training: a stage that failed by itself would exit while unwinding, not through SIGTERM.
        assert proc.poll() is None, stderr_file.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / ".lock").exists() and not (run_dir / "baseline").exists()


@pytest.mark.integration
def test_s3_second_writer_refused_by_a_conditional_put(s3_endpoint, raw, capsys):  # noqa: F811
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="runs")
    run_dir = "s3://runs/demo"
    held = run_lock.acquire(run_dir, "train")
    # The create itself is conditional: a second one fails even without looking first.
    assert run_lock._create(f"{run_dir}/.lock", b"{}") is False
    assert _prepare(raw, run_dir) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"recllm prepare: error: {run_dir}/.lock: run_dir is locked by stage train, "
                           f"pid {os.getpid()} on host {socket.gethostname()}")
    held.release()
    assert _prepare(raw, run_dir) == 0
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert fs.exists("runs/demo/dataset/manifest.json") and not fs.exists("runs/demo/.lock")
    # A stale lock on S3 (written by a crashed run long ago) is broken with --break-lock.
    fs.pipe_file("runs/demo/.lock", json.dumps({"host": "elsewhere", "pid": 1, "stage": "prepare",
                                                "started_unix": time.time() - 48 * 3600}).encode())
    assert _prepare(raw, run_dir) == 2
    assert "older than 24 h" in _one_error_line(capsys)
    assert _prepare(raw, run_dir, "--break-lock") == 0
    assert not fs.exists("runs/demo/.lock")
