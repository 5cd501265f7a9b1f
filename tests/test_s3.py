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
