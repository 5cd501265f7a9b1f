"""Two runs on one machine: two `recllm pipeline configs/demo.yaml` on different run_dirs, started together.

Each starts its own local Ray. Both must exit 0 with no traceback on either console, and, training being
deterministic, both must write the same top-K and the same report numbers. Before each local Ray got its own GCS
port and told its workers where it is (data_pipeline/ray_session.py), Ray Train's placement-group cleaner in one run
found the other run's Ray by scanning the host and died with "Found multiple active Ray instances".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, scientific_slice

SLICE_USERS = 600
SHORT = ["text.vectors=false", "baseline.epochs=1", "train.max_steps=20", "train.eval_every=20",
         "train.eval_users=100", "train.checkpoint_every=20"]


def _start(run_dir: Path, raw: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # each run starts its own local Ray, as a user's two terminals would
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "pipeline", str(REPO / "configs" / "demo.yaml"),
                             f"run_dir={run_dir}", f"data.path={raw}", *SHORT],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
def test_two_pipelines_started_together_each_see_only_their_own_ray(tmp_path):
    raw = scientific_slice(tmp_path / "raw", SLICE_USERS)
    runs = [tmp_path / "run_a", tmp_path / "run_b"]
    procs = [_start(run_dir, raw) for run_dir in runs]
    consoles = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        consoles.append(out)
        assert proc.returncode == 0, out[-3000:]
    for out in consoles:
        where = out.find("Traceback")
        assert where < 0, out[max(0, where - 1500):where + 3000]  # the traceback itself, not the console's end
        assert "multiple active Ray instances" not in out
    first, second = (pq.read_table(run / "topk").sort_by("user_id") for run in runs)
    assert first.num_rows == SLICE_USERS
    assert first.equals(second)
    metrics = [{model: {k: v for k, v in values.items() if "@" in k}  # the ranking numbers, not timings
                for model, values in json.loads((run / "report" / "metrics.json").read_text())["models"].items()}
               for run in runs]
    assert set(metrics[0]) >= {"recllm", "sasrec", "popular"}
    assert metrics[0] == metrics[1]
