"""SIGKILL chaos for infer and evaluate, in the style of test_sigkill_chaos.py, on the toy run (30 users, 12
items; seconds per run).

Each command runs once with other settings (the previous complete output: top_k=4, eval.ks=[1,3]), once
uninterrupted with the settings under test on a copy (the reference), then is started again and SIGKILLed:
evaluate at a seeded random delay and the moment its staged report appears; infer once it has staged a seeded
random number (1 or 2) of its 4 shards, and again the moment the resumed run stages one more; then run to the
end. After every kill the output folder is the previous one byte for byte (or, where the kill came after
publishing, the complete new one) and nothing else is visible in run_dir; the final run's output equals the
reference: every data file byte for byte, the JSON markers apart from timings and how much was computed by
which run. Bounded: 5 subprocess runs of 5-15 s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.toy_run import CONFIG, FAST, build_toy_run, comparable, stage, tree

pytestmark = pytest.mark.integration

SEED = 18
RUN_TIMEOUT_S = 180
SHARDS = ["infer.users_per_shard=8"]
"""4 shards of the 30 users, scored one after another by one replica: room for a kill between two."""
RESUMED = {"seconds", "users_per_second", "shards_computed", "users_scored", "users_reused"}
"""_SUCCESS keys that say how this run got there (a resumed run computes fewer shards), not what it wrote."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("sigkill_readers"))


def _start(command: str, run_dir: Path, log: Path, *overrides: str, ray_address: str | None = None) -> subprocess.Popen:
    """The CLI in its own session, so the SIGKILL reaches every process it started."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address  # the session's Ray: no cluster start per run
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "launcher.cli", command, CONFIG, f"run_dir={run_dir}", *FAST,
                                 *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _run(command: str, run_dir: Path, log: Path, *overrides: str, ray_address: str | None = None) -> float:
    start = time.monotonic()
    proc = _start(command, run_dir, log, *overrides, ray_address=ray_address)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    return time.monotonic() - start


def _kill(proc: subprocess.Popen, delay: float | None, trigger) -> str:
    """SIGKILL after ``delay`` seconds, or (None) the moment ``trigger()`` holds; where the kill landed."""
    deadline = time.monotonic() + (delay if delay is not None else RUN_TIMEOUT_S)
    while time.monotonic() < deadline and proc.poll() is None:
        if delay is None and trigger():
            break
        time.sleep(0.001 if delay is None else 0.01)
    fired = trigger()
    if proc.poll() is not None:
        return "after it finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return "mid-write" if fired else "before writing"


def _visible(run_dir: Path) -> set[str]:
    """run_dir's stage outputs (hidden staged folders apart, and logs/, the libraries' log every command appends to)."""
    return {p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name != "logs"}


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".staging"))


def _chaos(command, run_dir, name, log, overrides, reference, kills, same, ray_address=None) -> list[str]:
    """Kill ``command`` at each of ``kills`` (a delay, or a trigger), check run_dir/``name`` after each, then run
    it to the end; returns where each kill landed."""
    out, landed = run_dir / name, []
    before_visible = _visible(run_dir) | {name}
    for delay, make_trigger in kills:
        previous = tree(out)
        trigger, t0 = make_trigger(), time.monotonic()
        where = _kill(_start(command, run_dir, log, *overrides, ray_address=ray_address), delay, trigger)
        if where == "before writing" and tree(out) != previous:
            where = "after publishing"  # published and exiting when the kill came (a busy box stretches that)
        landed.append(where)
        print(f"{command}: killed after {time.monotonic() - t0:.1f}s at "
              f"{f'{delay:.1f}s' if delay is not None else trigger.__doc__}: {where}")
        if where in ("after it finished", "after publishing"):
            assert same(tree(out), reference), f"{command} killed {where}: {name}/ is not the complete new one"
        else:
            assert tree(out) == previous, f"{command} killed {where}: {name}/ changed"
        assert _visible(run_dir) <= before_visible, _visible(run_dir)
    print(f"{command}: the final run took {_run(command, run_dir, log, *overrides, ray_address=ray_address):.1f}s")
    assert same(tree(out), reference)
    assert _leftovers(run_dir) == [] and not (run_dir / ".lock").exists()
    return landed


def _same_topk(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """Every shard byte for byte, _SUCCESS apart from timings and what this run computed itself."""
    def strip(files):
        return {rel: {k: v for k, v in json.loads(data).items() if k not in RESUMED} if rel == "_SUCCESS" else data
                for rel, data in files.items()}
    return strip(a) == strip(b)


def test_sigkilled_infer_leaves_the_previous_topk_and_resumes_identically(built, ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "runs.log"
    ref_dir = shutil.copytree(built, tmp_path / "ref")
    assert stage("infer", ref_dir, *SHARDS) == 0  # the uninterrupted run
    reference = tree(ref_dir / "topk")
    assert len([r for r in reference if r.startswith("part-")]) == 4

    run_dir = shutil.copytree(built, tmp_path / "run")
    assert stage("infer", run_dir, *SHARDS, "infer.top_k=4") == 0  # the previous complete top-K (other settings)
    assert not _same_topk(tree(run_dir / "topk"), reference)
    staging = run_dir / ".topk.staging"

    def new_shards_staged(count: int):
        def make():
            already = set(staging.glob("part-*.parquet"))

            def staged():
                return len(set(staging.glob("part-*.parquet")) - already) >= count
            staged.__doc__ = f"{count} new shard(s) staged"
            return staged
        return make

    rng = random.Random(SEED)  # a seeded random point in the run's progress: after 1 or 2 of its 4 shards
    kills = [(None, new_shards_staged(rng.randint(1, 2))), (None, new_shards_staged(1))]
    landed = _chaos("infer", run_dir, "topk", log, SHARDS, reference, kills, _same_topk, address)
    assert landed[0] == "mid-write", landed  # shards were staged, the top-K not yet published
    final = json.loads((run_dir / "topk" / "_SUCCESS").read_text())
    assert final["shards_computed"] < 4, final  # the rerun adopted what the killed runs had staged


def test_sigkilled_evaluate_leaves_the_previous_report_and_reruns_identically(built, ray_local, tmp_path):
    log = tmp_path / "runs.log"
    inferred = tmp_path / "inferred"
    shutil.copytree(built, inferred)
    assert stage("infer", inferred) == 0
    ref_dir = shutil.copytree(inferred, tmp_path / "ref")
    seconds = _run("evaluate", ref_dir, log)
    reference = tree(ref_dir / "report")

    run_dir = shutil.copytree(inferred, tmp_path / "run")
    assert stage("evaluate", run_dir, "eval.ks=[1,3]") == 0  # the previous complete report (other cut-offs)
    assert tree(run_dir / "report") != reference

    def report_staged():
        """staged report folder"""
        return any(p.name.startswith(".report.tmp-") for p in run_dir.iterdir())

    rng = random.Random(SEED)
    kills = [(rng.uniform(0.3, 1.0) * seconds, lambda: report_staged), (None, lambda: report_staged)]

    def same(a, b):
        return comparable(a) == comparable(b) and {k: v for k, v in a.items() if not k.endswith(".json")} == \
            {k: v for k, v in b.items() if not k.endswith(".json")}

    landed = _chaos("evaluate", run_dir, "report", log, [], reference, kills, same)
    assert landed[-1] == "mid-write", landed
