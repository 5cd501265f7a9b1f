"""SIGKILL chaos for build-ids and build-samples: each stage runs once uninterrupted (the previous complete output),
then is started again and SIGKILLed three times, at two seeded random delays and once the moment its staged
folder appears (a kill mid-write), then run to the end. After every kill the output folder is still the previous
complete one (no staged folder renamed into place, no half-written file visible); the final run's output equals the uninterrupted one: every data file byte for byte, the JSON manifests
apart from their timings. Bounded: 8 subprocess runs of a few seconds each on a 1,200-user slice. Beside it,
the staged folder's own rules: a dead writer's temporaries go, a live one's stay, an output moved aside is put back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import storage
from launcher.cli import main
from tests.conftest import REPO, scientific_slice
from tests.test_determinism import SLICE_USERS
from tests.toy_run import comparable, tree

CONFIG = str(REPO / "configs" / "alignment_sft.yaml")
SMALL = ["seed=7", "ids.levels=3", "ids.codes=64", "ids.epochs=15", "baseline.epochs=2", "baseline.eval_every=2",
         "ids.llm_alignment=false"]
OUTPUT = {"build-ids": "item_ids", "build-samples": "samples"}
SEED = 18
RUN_TIMEOUT_S = 180


def _start(command: str, run_dir: Path, raw: Path, log: Path) -> subprocess.Popen:
    """The CLI in its own session (so a SIGKILL reaches every process it started); --break-lock because a
    killed run leaves its lock behind."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "launcher.cli", command, CONFIG, f"run_dir={run_dir}",
                                 f"data.path={raw}", *SMALL, "--break-lock"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                                start_new_session=True)


def _run(command: str, run_dir: Path, raw: Path, log: Path) -> float:
    start = time.monotonic()
    proc = _start(command, run_dir, raw, log)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    return time.monotonic() - start


def _staged(run_dir: Path, name: str) -> bool:
    return any(entry.name.startswith(f".{name}.tmp-") for entry in os.scandir(run_dir))


def _kill(proc: subprocess.Popen, run_dir: Path, name: str, delay: float | None) -> str:
    """SIGKILL the run after ``delay`` seconds, or (None) the moment its staged output folder appears; returns
    where the kill landed."""
    deadline = time.monotonic() + (delay if delay is not None else RUN_TIMEOUT_S)
    while time.monotonic() < deadline and proc.poll() is None:
        if delay is None and _staged(run_dir, name):
            break
        time.sleep(0.001 if delay is None else 0.01)
    staged = _staged(run_dir, name)
    if proc.poll() is not None:
        return "after it finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return "mid-write" if staged else "before writing"


@pytest.mark.integration
def test_sigkilled_build_ids_and_build_samples_leave_the_previous_output_and_rerun_identically(tmp_path):
    raw = scientific_slice(tmp_path / "raw", SLICE_USERS)
    run_dir, log = tmp_path / "run", tmp_path / "runs.log"
    for command in ("prepare", "train-baseline"):  # build-ids codes the baseline's item embeddings
        assert main([command, CONFIG, f"run_dir={run_dir}", f"data.path={raw}", *SMALL]) == 0
    rng = random.Random(SEED)
    landed: dict[str, list[str]] = {}
    for command, name in OUTPUT.items():
        out = run_dir / name
        seconds = _run(command, run_dir, raw, log)
        reference = tree(out)
        delays = [rng.uniform(0.3, 1.0) * seconds for _ in range(2)] + [None]
        for delay in delays:
            previous = tree(out)
            where = _kill(_start(command, run_dir, raw, log), run_dir, name, delay)
            landed.setdefault(command, []).append(where)
            print(f"{command}: uninterrupted {seconds:.1f}s, killed at "
                  f"{'staged folder' if delay is None else f'{delay:.1f}s'}: {where}")
            if where == "before writing" and tree(out) != previous:
                # no staged folder was seen and the process was alive: it had published and was exiting (a busy
                # box stretches that window); the output must then be the complete new one (checked below)
                where = landed[command][-1] = "after publishing"
            if where not in ("after it finished", "after publishing"):
                assert tree(out) == previous, f"{command} killed {where}: {name}/ changed"
            assert comparable(tree(out)) == comparable(reference)
            visible = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
            assert visible <= {"dataset", "baseline", "item_ids", "samples", "config", "logs"}, visible
        assert landed[command][-1] == "mid-write", landed  # the staged folder existed when the kill came
        _run(command, run_dir, raw, log)
        again = tree(out)
        assert comparable(again) == comparable(reference)
        assert {k: v for k, v in again.items() if not k.endswith(".json")} == \
               {k: v for k, v in reference.items() if not k.endswith(".json")}
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [] and not (run_dir / ".lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_next_writer_removes_only_a_dead_writers_temporaries(tmp_path):
    host = storage._HOST
    writer = subprocess.Popen(["sleep", "60"])  # another process, alive: its temporary is kept
    try:
        dead = tmp_path / f".out.tmp-0badc0de-{_dead_pid()}@{host}"
        live = tmp_path / f".out.tmp-0000beef-{writer.pid}@{host}"
        remote = tmp_path / ".out.tmp-12345678-1@another-host"  # its writer cannot be checked from here: kept
        ours_failed = tmp_path / f".out.tmp-0000cafe-{os.getpid()}@{host}"  # this process's earlier failed one
        for folder in (dead, live, remote, ours_failed):
            (folder / "part").mkdir(parents=True)
        with storage.staged_folder(str(tmp_path / "out")) as other:  # this process, writing out/ concurrently
            other.write_bytes("a.txt", b"newer")
            with storage.staged_folder(str(tmp_path / "out")) as staged:
                staged.write_bytes("a.txt", b"new")
            assert os.path.isfile(os.path.join(other.tmp_path, "a.txt"))  # in use here: not a failed one's
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, remote.name])
        assert (tmp_path / "out" / "a.txt").read_bytes() == b"newer"
    finally:
        writer.kill()


def test_a_previous_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    """Where no atomic exchange exists, publishing is two renames; a kill between them leaves the previous
    output whole under .old-, and the next writer puts it back before anything else."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("previous")
    (tmp_path / "out").rename(tmp_path / f".out.old-0badc0de-{_dead_pid()}@{storage._HOST}")
    storage.StagedFolder(str(tmp_path / "out")).clear_leftovers()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "previous"


def test_publish_without_an_atomic_exchange_still_replaces_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    for version in ("one", "two"):
        with storage.staged_folder(str(tmp_path / "out")) as staged:
            staged.write_bytes("a.txt", version.encode())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "two"
