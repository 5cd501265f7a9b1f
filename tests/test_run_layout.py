"""RunLayout: every path under run_dir, the same on local disk and on s3:// (moto), and the shared tables read
through storage; the paths are the ones `recllm prepare` writes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.errors import DataError
from data_pipeline.run_layout import RunLayout
from tests.test_s3 import s3_endpoint  # noqa: F401 - the moto S3 server fixture

EXPECTED = {
    "lock": ".lock",
    "dataset": "dataset",
    "dataset_manifest": "dataset/manifest.json",
    "items": "dataset/items.parquet",
    "users": "dataset/users.parquet",
    "interactions": "dataset/interactions",
    "item_ids": "item_ids",
    "item_codes": "item_ids/item_codes.parquet",
    "user_codes": "item_ids/user_codes.parquet",
    "tokens": "item_ids/tokens.json",
    "codebook": "item_ids/codebook.safetensors",
    "item_ids_stats": "item_ids/stats.json",
    "baseline": "baseline",
    "samples": "samples",
    "samples_manifest": "samples/manifest.json",
    "train": "train",
    "train_metrics": "train/logs/metrics.jsonl",
    "model": "model",
    "topk": "topk",
}


@pytest.mark.parametrize("run_dir", ["runs/demo", "/abs/runs/demo", "s3://bucket/recllm/runs/demo"])
def test_every_path_is_under_run_dir(run_dir):
    layout = RunLayout(run_dir)
    for name, rel in EXPECTED.items():
        assert getattr(layout, name) == f"{run_dir}/{rel}", name
    assert [layout.sequences(s) for s in ("train", "valid", "test")] == [
        f"{run_dir}/dataset/sequences/{s}" for s in ("train", "valid", "test")]
    assert layout.samples_split("test") == f"{run_dir}/samples/test"
    assert layout.report() == f"{run_dir}/report"
    assert layout.report("loid") == f"{run_dir}/report/loid"
    assert layout.domain("music") == f"{run_dir}/domains/music"
    assert layout.loid() == f"{run_dir}/loid"
    assert layout.loid("source_music") == f"{run_dir}/loid/source_music"


def test_a_split_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="'tset'"):
        RunLayout("runs/demo").sequences("tset")


def test_the_paths_are_where_prepare_writes(demo_dataset):
    layout = RunLayout(str(demo_dataset.parent))
    for path in (layout.dataset_manifest, layout.items, layout.users, layout.interactions,
                 *(layout.sequences(s) for s in ("train", "valid", "test"))):
        assert (demo_dataset.parent / path[len(layout.run_dir) + 1:]).exists(), path
    manifest = layout.read_manifest()
    assert manifest == json.loads((demo_dataset / "manifest.json").read_text())
    assert layout.read_sequences("test").num_rows == manifest["counts"]["users"]


def _write_tiny_run(root) -> dict:
    """A run_dir with the tables the readers read: two users, three items, atomic item codes."""
    (root / "dataset" / "sequences" / "valid").mkdir(parents=True)
    (root / "item_ids").mkdir()
    manifest = {"counts": {"users": 2, "items": 3}}
    (root / "dataset" / "manifest.json").write_text(json.dumps(manifest))
    for k, (users, histories, targets) in enumerate([([0], [[0]], [1]), ([1], [[1, 2]], [0])]):
        pq.write_table(pa.table({"user_id": users, "history": histories, "target": targets}),
                       root / "dataset" / "sequences" / "valid" / f"part-{k:05d}.parquet")
    pq.write_table(pa.table({"item_id": [0, 1, 2], "source_id": ["a", "b", "c"], "codes": [[0], [1], [2]],
                             "tokens": [["<item_0>"], ["<item_1>"], ["<item_2>"]]}),
                   root / "item_ids" / "item_codes.parquet")
    (root / "item_ids" / "tokens.json").write_text(json.dumps(["<item_0>", "<item_1>", "<item_2>"]))
    return manifest


def _check_readers(layout: RunLayout, manifest: dict) -> None:
    assert layout.read_manifest() == manifest
    valid = layout.read_sequences("valid")
    assert valid.column("user_id").to_pylist() == [0, 1]  # file order: part-00000 first
    assert valid.column("history").to_pylist() == [[0], [1, 2]]
    assert layout.read_sequences("valid", columns=["target"]).column_names == ["target"]
    assert layout.read_item_codes().column("item_id").to_pylist() == [0, 1, 2]
    assert layout.read_new_tokens() == ["<item_0>", "<item_1>", "<item_2>"]


def test_readers_on_local_disk(tmp_path):
    _check_readers(RunLayout(str(tmp_path)), _write_tiny_run(tmp_path))


def test_a_missing_dataset_says_to_run_prepare(tmp_path):
    with pytest.raises(DataError, match="run `recllm prepare` first") as err:
        RunLayout(str(tmp_path)).read_manifest()
    assert "dataset/manifest.json" in str(err.value)
    with pytest.raises(DataError, match="run `recllm build-ids` first"):
        RunLayout(str(tmp_path)).read_item_codes()


@pytest.mark.integration
def test_readers_on_s3(tmp_path, s3_endpoint):  # noqa: F811 - the fixture imported above
    import boto3

    from data_pipeline import storage

    manifest = _write_tiny_run(tmp_path)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="runs")
    storage.upload_folder(str(tmp_path), "s3://runs/tiny")
    layout = RunLayout("s3://runs/tiny")
    assert storage.exists(layout.item_codes) and not storage.exists(layout.user_codes)
    _check_readers(layout, manifest)
