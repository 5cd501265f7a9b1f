"""S3 that fails: recllm's S3 client talks to moto's server through tests/flaky_s3.py's proxy on 127.0.0.1.

- With 15% of requests failing (HTTP 500, 503 or a dropped connection, seeded), prepare, build-ids and
  build-samples on an s3:// run_dir succeed by retrying, and every object they write equals a fault-free run's.
- When every request fails from a point inside a stage on (an outage), the stage exits 2 with one line. Before
  the publish, the previous complete output is as it was; during it, readers refuse the half-replaced folder
  and the next writing stage puts the previous output back from the whole copy taken first: nothing is lost.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.flaky_s3 import FlakyProxy
from tests.toy_run import VOLATILE, stage, write_raw

pytestmark = pytest.mark.integration

STAGES = {"prepare": "dataset", "build-ids": "item_ids", "build-samples": "samples"}
SEED = 18


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def flaky_s3(monkeypatch, tmp_path):
    """(proxy, moto's own endpoint): AWS_ENDPOINT_URL points at the proxy, which starts fault-free."""
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = FlakyProxy(port).start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    direct = f"http://127.0.0.1:{port}"
    import urllib.request

    # moto's servers in one process share one in-memory S3: start each test from an empty one
    urllib.request.urlopen(urllib.request.Request(f"{direct}/moto-api/reset", method="POST")).read()
    s3 = boto3.client("s3", endpoint_url=direct)
    for bucket in ("raw", "runs"):
        s3.create_bucket(Bucket=bucket)
    raw = write_raw(tmp_path / "raw")
    s3.upload_file(str(raw / "Toy.inter.json"), "raw", "toy/Toy.inter.json")
    yield proxy, direct
    fsspec.filesystem("s3").clear_instance_cache()
    proxy.stop()
    server.stop()


def _objects(endpoint: str, prefix: str) -> dict[str, object]:
    """Every object under s3://runs/PREFIX/ by key (read straight from moto, past the proxy); JSON parsed with
    its timings dropped and the run_dir's own name made neutral."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            key = item["Key"][len(prefix) + 1:]
            data = s3.get_object(Bucket="runs", Key=item["Key"])["Body"].read()
            if key.endswith(".json"):
                data = _strip(json.loads(data.decode().replace(f"runs/{prefix}", "runs/RUN")))
            out[key] = data
    return out


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _run_stages(run: str) -> None:
    for command in STAGES:
        extra = ["data.path=s3://raw/toy", "data.name=Toy"] if command == "prepare" else []
        assert stage(command, f"s3://runs/{run}", *extra) == 0, command


def test_stages_retry_through_a_flaky_s3_to_the_fault_free_result(flaky_s3):
    proxy, direct = flaky_s3
    _run_stages("clean")
    clean = _outputs(_objects(direct, "clean"))
    assert {key.split("/")[0] for key in clean} == set(STAGES.values())

    proxy.rate, proxy.rng = 0.15, __import__("random").Random(SEED)
    _run_stages("flaky")
    print(f"faults injected: {dict(proxy.faults)} over {proxy.forwarded} forwarded requests")
    assert set(proxy.faults) == {"500", "503", "drop"} and sum(proxy.faults.values()) >= 10, proxy.faults
    recorded = _objects(direct, "flaky")
    flaky = _outputs(recorded)
    assert flaky == clean
    assert not [key for key in recorded if ".tmp-" in key or ".lock" in key]
    assert "config/runs.jsonl" in recorded  # the run_dir's record came through the faults too


def _outputs(objects: dict) -> dict:
    """The stages' outputs: run_dir/config/ records the commands (run_dir, times), not what they produced."""
    return {k: v for k, v in objects.items() if not k.startswith("config/")}


def _publish_starts(log: list[tuple[str, str]], name: str) -> int:
    """The index of the stage's first request that changes run_dir/NAME/ itself (its publish)."""
    for i, (method, path) in enumerate(log):
        if method in ("PUT", "POST", "DELETE") and path.split("?")[0].startswith(f"/runs/run/{name}/"):
            return i
    raise AssertionError(f"no write to {name}/ in {log}")


def _outage(proxy, direct, capsys, command: str, name: str, at) -> tuple[dict, dict]:
    """Run ``command`` with a new seed once fault-free (the output it replaces, and the requests it makes), then
    again with an outage that ``at(proxy, log)`` arms; (output before, output after the outage)."""
    extra = ["data.path=s3://raw/toy", "data.name=Toy"] if command == "prepare" else []
    proxy.forwarded, proxy.log = 0, []
    assert stage(command, "s3://runs/run", *extra, "seed=8") == 0  # the previous complete output
    before = _objects(direct, "run")
    log = list(proxy.log)
    proxy.forwarded = 0
    at(proxy, log)
    capsys.readouterr()
    code = stage(command, "s3://runs/run", *extra, "seed=9")
    proxy.fail_after = proxy.trip = None
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"recllm {command}")]
    print(f"{command}: outage from request {proxy.forwarded} of {len(log)} (publish starts at "
          f"{_publish_starts(log, name)}): {lines}")
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    assert "s3://runs/run/" in lines[0] or "object store request failed after retries" in lines[0], lines[0]
    # the output's staged copy may stay behind (hidden; the next writer removes it) and so may run_dir/.lock,
    # which an outage keeps the stage from releasing (the next run breaks it with --break-lock)
    return before, _objects(direct, "run")


def _visible(objects: dict) -> dict:
    return {k: v for k, v in objects.items() if not any(part.startswith(".") for part in k.split("/"))}


@pytest.mark.parametrize("command", list(STAGES))
def test_an_s3_outage_before_publishing_is_one_line_and_keeps_the_previous_output(command, flaky_s3, capsys):
    """The outage starts at a seeded random one of the stage's writes into its staged folder (their count taken
    from the fault-free run), before it publishes."""
    import random

    proxy, direct = flaky_s3
    _run_stages("run")
    rng = random.Random(f"{SEED}-{command}")
    name = STAGES[command]

    def arm(proxy, log):
        staged = [p for m, p in log if m == "PUT" and p.startswith(f"/runs/run/.{name}.tmp-")]
        proxy.trip = (f"/runs/run/.{name}.tmp-", rng.randint(1, len(staged)))

    before, after = _outage(proxy, direct, capsys, command, name, arm)
    assert _visible(after) == _visible(before)


def test_an_s3_outage_mid_publish_loses_nothing(flaky_s3, capsys):
    """Object stores have no folder rename, so a publish replaces dataset/ file by file. An outage in the
    middle leaves it half replaced; readers refuse the half (no manifest), the previous output is whole in a
    hidden copy taken first, and the next writing stage in the run_dir puts it back before it reads it."""
    import boto3

    proxy, direct = flaky_s3
    _run_stages("run")

    def arm(proxy, log):  # the previous output is copied aside, the replacing begins, then the outage
        proxy.trip = ("/runs/run/dataset/", 2)

    before, after = _outage(proxy, direct, capsys, "prepare", "dataset", arm)
    assert "dataset/manifest.json" not in after  # what readers check first: the half-replaced folder is refused
    kept = {k.split("/", 1)[1]: v for k, v in after.items() if k.startswith(".dataset.old-")}
    assert kept.pop("_KEPT") == b""
    assert kept == {k.split("/", 1)[1]: v for k, v in _visible(before).items() if k.startswith("dataset/")}
    # the failed writer has exited; the next one breaks its lock, as --break-lock does once its pid is gone
    boto3.client("s3", endpoint_url=direct).delete_object(Bucket="runs", Key="run/.lock")
    assert stage("build-ids", "s3://runs/run", "seed=8") == 0  # reads dataset/: the previous one, put back
    assert "put back the previous output" in capsys.readouterr().err
    restored = _objects(direct, "run")
    dataset = lambda objects: {k: v for k, v in _visible(objects).items() if k.startswith("dataset/")}  # noqa: E731
    assert dataset(restored) == dataset(before)  # byte for byte (build-ids itself rewrote item_ids/)
    assert not [key for key in restored if ".old-" in key or ".tmp-" in key]
