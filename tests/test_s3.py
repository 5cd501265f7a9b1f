"""prepare with s3:// input and output against moto's S3 server on 127.0.0.1 gives the local result."""

from __future__ import annotations

import json
import socket

import pytest

from launcher.cli import main
from tests.conftest import DEMO_DATA, REPO

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    yield endpoint
    server.stop()


def test_prepare_from_and_to_s3_matches_local(tmp_path, s3_endpoint):
    import boto3
    import pyarrow.parquet as pq
    import s3fs

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="raw")
    s3.create_bucket(Bucket="runs")
    for name in ("Scientific.inter.json", "Scientific.item.json"):
        s3.upload_file(str(DEMO_DATA / name), "raw", f"scientific/{name}")

    config = str(REPO / "configs" / "alignment_sft.yaml")
    assert main(["prepare", config, "data.path=s3://raw/scientific", "run_dir=s3://runs/demo"]) == 0
    assert main(["prepare", config, f"run_dir={tmp_path}"]) == 0

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    remote = json.loads(fs.cat("runs/demo/dataset/manifest.json"))
    local = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert remote["counts"] == local["counts"] and remote["counts"]["users"] == 8317
    assert remote["files"] == local["files"]  # same bytes, file by file (sha256)
    with fs.open("runs/demo/dataset/sequences/test/part-00002.parquet", "rb") as f:
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "dataset/sequences/test/part-00002.parquet"))
    assert not [p for p in fs.ls("runs/demo") if ".tmp-" in p]  # the staging folder is gone


FAST_PIPELINE = ["samples.max_samples_per_task=600", "train.max_steps=10", "train.eval_every=5",
                 "train.eval_users=200", "train.log_every=5", "train.checkpoint_every=10", "baseline.epochs=2",
                 "infer.num_replicas=1", "infer.batch_size=512", "text.vectors=false"]


def _pipeline(cwd, run_dir: str, env: dict) -> None:
    """`recllm pipeline configs/demo.yaml` in its own process (its own Ray, with the endpoint in its env)."""
    import subprocess
    import sys
    from pathlib import Path

    recllm = str(Path(sys.executable).with_name("recllm"))
    out = subprocess.run([recllm, "pipeline", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}",
                          f"data.path={DEMO_DATA}", *FAST_PIPELINE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_demo_pipeline_with_an_s3_run_dir_matches_a_local_run(tmp_path, s3_endpoint):
    import os

    import boto3
    import pyarrow.parquet as pq
    import s3fs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="runs")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, which inherits the endpoint and credentials
    env.pop("RAY_ADDRESS")
    _pipeline(cwd, "s3://runs/demo", env)
    _pipeline(cwd, str(tmp_path / "local"), env)

    assert not list(cwd.rglob("s3:*")) and not list(REPO.glob("s3:*"))  # no folder named after the scheme
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for stage_output in ("dataset/manifest.json", "baseline/manifest.json", "item_ids/tokens.json", "samples/manifest.json",
                         "train/logs/metrics.jsonl", "train/best/best_state.json", "model/config.json",
                         "model/prompt_format.json", "topk/_SUCCESS", "report/metrics.json", "report/report.md"):
        assert fs.exists(f"runs/demo/{stage_output}"), stage_output
    assert not [p for p in fs.find("runs/demo") if ".tmp-" in p]
    local = tmp_path / "local"
    def scores(models: dict) -> dict:  # what the models scored, without how long they took
        return {name: {k: v for k, v in m.items() if "second" not in k} for name, m in models.items()}

    with fs.open("runs/demo/report/metrics.json") as f:
        remote_metrics = scores(json.load(f)["models"])
    assert remote_metrics == scores(json.loads((local / "report" / "metrics.json").read_text())["models"])
    assert remote_metrics["recllm"]["HR@10"] > 0
    remote_topk = pq.read_table("runs/demo/topk", filesystem=fs).sort_by("user_id")
    local_topk = pq.read_table(local / "topk").sort_by("user_id")
    assert remote_topk.column("item_ids").to_pylist() == local_topk.column("item_ids").to_pylist()
