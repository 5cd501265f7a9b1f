"""`recllm train-baseline`: the run's one SASRec, written to run_dir/baseline/ (weights, item embeddings, a manifest
with the valid score). build-ids (semantic) and evaluate read that folder and never train a SASRec of their own; a
baseline that is missing, trained on another dataset/ or with other settings stops them with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy

from data_pipeline.baseline_files import read_baseline
from data_pipeline.errors import DataError
from launcher.cli import main
from tests.conftest import REPO
from tests.test_item_ids import TINY_IDS, _prepare
from tests.test_s3 import s3_endpoint  # noqa: F401 - the fixture
from trainers.sasrec import load_sasrec

CONFIG = str(REPO / "configs" / "alignment_sft.yaml")
BASELINE = ["baseline.hidden_size=16", "baseline.epochs=3", "baseline.eval_every=1"]
IDS = [f"ids.{k}={v}" for k, v in TINY_IDS.items()] + ["ids.llm_alignment=false"]


def _run(command: str, run_dir, *extra: str) -> int:
    return main([command, CONFIG, f"run_dir={run_dir}", *BASELINE, *IDS, *extra])


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("recllm ")]


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file: a rewrite changes one or the other."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def _fake_topk(run_dir: Path) -> None:
    """A complete test-mode top-K (items 0-9 for every test user), as `recllm infer` leaves it."""
    if (run_dir / "topk").exists():
        return
    test = pq.read_table(run_dir / "dataset" / "sequences" / "test").sort_by("user_id")
    (run_dir / "topk").mkdir()
    lists = [list(range(10))] * test.num_rows
    pq.write_table(pa.table({"user_id": test.column("user_id"), "item_ids": lists}), run_dir / "topk" / "part-0.parquet")
    (run_dir / "topk" / "_SUCCESS").write_text(json.dumps({"mode": "test", "scorer": "beam", "top_k": 10}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = _prepare(tmp_path_factory.mktemp("baseline"))
    assert _run("train-baseline", run_dir) == 0
    return run_dir


def test_train_baseline_writes_weights_embeddings_and_a_manifest(trained):
    folder = trained / "baseline"
    assert sorted(p.name for p in folder.iterdir()) == ["item_embeddings.safetensors", "manifest.json",
                                                        "model.safetensors", "sasrec.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"] == "sasrec" and manifest["items"] == 200 and len(manifest["losses"]) == 3
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["hidden_size"] == 16
    assert 0 < manifest["valid"]["NDCG@10"] <= manifest["valid"]["HR@10"] <= 1
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], name
    embeddings = safetensors.numpy.load_file(str(folder / "item_embeddings.safetensors"))["item_embeddings"]
    assert embeddings.shape == (200, 16)
    assert np.array_equal(embeddings, load_sasrec(str(folder)).item_embeddings().numpy())
    assert not [p for p in trained.iterdir() if ".tmp-" in p.name]


def test_build_ids_and_evaluate_read_the_baseline_and_train_none(trained, monkeypatch, capsys):
    import trainers.baseline

    def no_training(*args, **kwargs):
        raise AssertionError("a consumer of run_dir/baseline/ trained a SASRec")

    monkeypatch.setattr(trainers.baseline, "train_sasrec", no_training)
    monkeypatch.setattr(trainers.baseline, "_train_one_epoch", no_training)
    before = _snapshot(trained / "baseline")

    assert _run("build-ids", trained) == 0
    stats = json.loads((trained / "item_ids" / "stats.json").read_text())
    assert stats["options"]["item_embeddings"]["source"] == "baseline"
    codebook = safetensors.numpy.load_file(str(trained / "item_ids" / "codebook.safetensors"))
    baseline = safetensors.numpy.load_file(str(trained / "baseline" / "item_embeddings.safetensors"))
    assert np.array_equal(codebook["item_embeddings"], baseline["item_embeddings"])

    _fake_topk(trained)
    assert _run("evaluate", trained, "eval.ks=[1,5,10]") == 0
    report = json.loads((trained / "report" / "metrics.json").read_text())
    assert set(report["models"]) == {"recllm", "popular", "sasrec", "content"}  # the tiny items have text
    assert _snapshot(trained / "baseline") == before


def test_a_baseline_with_other_settings_or_another_dataset_is_refused(trained, tmp_path, capsys):
    _fake_topk(trained)
    assert _run("evaluate", trained, "baseline.epochs=4") == 2  # the run_dir's record answers first
    [err] = _error_lines(capsys)
    assert "baseline.epochs=4 conflicts with 3, which `train-baseline` used" in err
    shutil.rmtree(trained / "config")  # without the record (a run_dir copied without it) the manifest still guards
    assert _run("evaluate", trained, "baseline.epochs=4") == 2
    [err] = _error_lines(capsys)
    assert err.startswith(f"recllm evaluate: error: {trained / 'baseline' / 'manifest.json'}: ")
    assert "epochs 3 -> 4" in err and "run `recllm train-baseline`" in err
    assert _run("build-ids", trained, "seed=1") == 2
    [err] = _error_lines(capsys)
    assert "seed 0 -> 1" in err

    other = _prepare(tmp_path, drop={"3"})  # a re-prepared catalogue, with the old baseline copied in
    (other / "baseline").mkdir()
    for path in (trained / "baseline").iterdir():
        (other / "baseline" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="trained on another dataset/"):
        read_baseline(str(other))


def test_evaluate_without_a_baseline_is_one_line(tmp_path, capsys):
    run_dir = _prepare(tmp_path)
    _fake_topk(run_dir)
    assert _run("evaluate", run_dir) == 2
    assert _error_lines(capsys) == [f"recllm evaluate: error: {run_dir / 'baseline' / 'manifest.json'}: no baseline; "
                   "run `recllm train-baseline` first"]
    assert not (run_dir / "report").exists()
    assert _run("evaluate", run_dir, "eval.baseline=false") == 0  # most popular and recllm only


@pytest.mark.integration
def test_baseline_and_semantic_ids_on_an_s3_run_dir(tmp_path, s3_endpoint):  # noqa: F811
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="runs")
    local = _prepare(tmp_path)
    run_dir = "s3://runs/tiny"
    assert _run("prepare", run_dir, f"data.path={tmp_path / 'raw'}", "data.name=Tiny") == 0
    assert _run("train-baseline", run_dir) == 0
    assert _run("build-ids", run_dir) == 0
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    remote = json.loads(fs.cat("runs/tiny/baseline/manifest.json"))
    assert remote["items"] == 200 and not [p for p in fs.find("runs/tiny") if ".tmp-" in p]
    stats = json.loads(fs.cat("runs/tiny/item_ids/stats.json"))
    assert stats["options"]["item_embeddings"]["path"] == "s3://runs/tiny/baseline"
    # The same seed and data give the same SASRec on S3 as on disk.
    assert _run("train-baseline", local) == 0
    assert remote["files"] == json.loads((local / "baseline" / "manifest.json").read_text())["files"]
