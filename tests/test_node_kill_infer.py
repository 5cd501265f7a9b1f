"""A node lost during `recllm infer`: a 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, the
head and a worker node, 1 CPU each, so each of the 2 replicas runs on its own node); the worker node is removed
(its raylet and workers killed) once the run has staged its first shards. The run either completes on the head
alone, or fails and its re-run completes, adopting what was staged; either way the top-K equals an
uninterrupted run's byte for byte and nothing partial is visible. Bounded: 3 runs of 10-40 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_sigkill_readers import _same_topk
from tests.toy_run import CONFIG, FAST, build_toy_run, tree

pytestmark = pytest.mark.integration

SEQUENCES = {str(u): [(u * 7 + k * (1 + u % 5)) % 12 for k in range(6)] for u in range(600)}
INFER = ["infer.num_replicas=2", "infer.cpus_per_replica=1", "infer.users_per_shard=10", "infer.scorer=beam",
         "infer.num_beams=10", "infer.top_k=5"]
RUN_TIMEOUT_S = 300


@pytest.fixture()
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the nodes' workers import recllm
    two_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = two_nodes.add_node(num_cpus=1)
    two_nodes.wait_for_nodes()
    yield two_nodes, worker
    two_nodes.shutdown()


def _infer(run_dir: Path, address: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "launcher.cli", "infer", CONFIG, f"run_dir={run_dir}", *FAST,
                                 *INFER, "--break-lock"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address},
                                start_new_session=True)


def _staged(run_dir: Path) -> int:
    return len(list((run_dir / ".topk.staging").glob("part-*.parquet")))


def test_a_worker_node_lost_during_infer_loses_nothing(cluster, tmp_path):
    two_nodes, worker = cluster
    log = tmp_path / "runs.log"
    built = build_toy_run(tmp_path / "toy", SEQUENCES)
    ref_dir = shutil.copytree(built, tmp_path / "ref")
    proc = _infer(ref_dir, two_nodes.address, log)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
    reference = tree(ref_dir / "topk")
    shards = len([r for r in reference if r.startswith("part-")])
    assert shards == 60

    run_dir = shutil.copytree(built, tmp_path / "run")
    proc = _infer(run_dir, two_nodes.address, log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _staged(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before the node could be lost"
    staged_at_loss = _staged(run_dir)
    two_nodes.remove_node(worker)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        code = "hung"
    print(f"worker node removed with {staged_at_loss} of {shards} shards staged; the run: {code}")
    assert not (run_dir / "topk").exists() or code == 0  # nothing partial published
    if code != 0:
        proc = _infer(run_dir, two_nodes.address, log)  # the head alone now
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-3000:]
        final = json.loads((run_dir / "topk" / "_SUCCESS").read_text())
        print(f"the re-run computed {final['shards_computed']} shards")
        assert final["shards_computed"] < shards  # it adopted what was staged before the loss
    assert _same_topk(tree(run_dir / "topk"), reference)
    assert not (run_dir / ".topk.staging").exists() and not (run_dir / ".lock").exists()
