"""bench/gpu_quality.py in its CPU smoke mode, so the GPU quality bench cannot rot between GPU loans: on a run_dir
prepared by the real stages it trains the demo model a few steps with the registered objective (full and LoRA),
validates, scores the test split, and trains SASRec beside it; every number is a metric in [0, 1]."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from launcher.cli import main as recllm
from tests.conftest import REPO

pytestmark = pytest.mark.integration  # build-ids and build-samples run Ray Data

BENCH = REPO / "bench" / "gpu_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_trains_validates_and_scores_beside_sasrec(tmp_path, bench, ray_local):
    run_dir = tmp_path / "run"
    args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", "samples.max_samples_per_task=400",
            "baseline.epochs=1", "text.vectors=false"]
    for stage in ("prepare", "train-baseline", "build-ids", "build-samples"):
        assert recllm([stage, *args]) == 0
    results = {}
    for finetune in ("full", "lora"):
        out = tmp_path / finetune
        assert bench.main(["--runs", f"seq={run_dir}", "--variants", "tiny", "--device", "cpu", "--smoke",
                           "--out", str(out), f"train.finetune={finetune}", "baseline.epochs=1"]) == 0
        results[finetune] = json.loads((out / "gpu_quality.json").read_text())
        assert "| tiny |" in (out / "gpu_quality.md").read_text()
    full, lora = results["full"]["variants"]["tiny"], results["lora"]["variants"]["tiny"]
    assert [r["step"] for r in full["train"]["rounds"]] == [2, 4]
    for row in (full, lora):
        assert all(0.0 <= row["test"][m] <= 1.0 for m in ("HR@10", "NDCG@10", "HR@20"))
        assert row["train"]["best"]["step"] in (2, 4)
    assert full["train"]["trainable"] == full["train"]["parameters"]
    assert lora["train"]["trainable"] < full["train"]["trainable"] / 2  # adapters + new rows, not the whole model
    baselines = results["full"]["baselines"]
    assert set(baselines) == {"sasrec", "popular"} and baselines["sasrec"]["HR@10"] > 0.0
