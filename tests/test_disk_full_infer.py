"""A disk that fills up during `recllm infer` (test_disk_full.py's Disk: writes through the local filesystem
raise OSError(ENOSPC) once a byte budget is spent) and during the model export that ends `recllm train`.

infer writes its shards in Ray replicas, other processes: the replica class is swapped for one that fills its
own process's disk first. Each case must end in one line naming the file, exit 2, the previous complete output
byte for byte as it was and no temporary left; with room again the same command succeeds with the same output
as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_disk_full import Disk, disk  # noqa: F401 - the fixture
from tests.test_sigkill_readers import SHARDS, _same_topk
from tests.toy_run import build_toy_run, stage, tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("disk_full_infer"))


def _temporaries(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"recllm {command}")]
    assert len(lines) == 1, err[-3000:]
    # the replica's error came back as itself, not through Ray Data's failed-dataset path (its ERROR records
    # and a remote traceback); stage() raising anything but the project's errors would have failed the test
    assert "UserCodeException" not in err and "execution failed" not in err, err[-3000:]
    return lines[0]


def _full_disk_replicas(monkeypatch, room: int) -> None:
    """Replace infer's replica class with one whose process has ``room`` bytes of disk."""
    from inference import ray_infer

    class FullDiskShardWorker(ray_infer.ShardWorker):  # defined here, so Ray ships it by value with ``room``
        def __init__(self, *args, **kwargs):
            from fsspec.implementations.local import LocalFileOpener

            disk = Disk()
            disk.room = room
            LocalFileOpener.write = lambda opener, data, *a, **k: disk.write(opener, data, *a, **k)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ray_infer, "ShardWorker", FullDiskShardWorker)


@pytest.mark.parametrize("where", ["replica", "driver"])
def test_full_disk_mid_infer_keeps_the_previous_topk(where, built, ray_local, disk, tmp_path, capsys, monkeypatch):
    """replica: the second shard's write fails in the replica (room for one and a half); driver: the staged _SUCCESS,
    written by the driver after every shard, fails."""
    reference_dir = shutil.copytree(built, tmp_path / "reference")
    assert stage("infer", reference_dir, *SHARDS) == 0
    reference = tree(reference_dir / "topk")
    shard_bytes = sum(len(data) for rel, data in reference.items() if rel.startswith("part-"))

    run_dir = shutil.copytree(built, tmp_path / "run")
    assert stage("infer", run_dir, *SHARDS, "infer.top_k=4") == 0  # the previous complete top-K
    previous = tree(run_dir / "topk")
    topk = run_dir / "topk"

    capsys.readouterr()
    if where == "replica":
        _full_disk_replicas(monkeypatch, shard_bytes * 3 // 8)  # a shard and a half
    else:
        disk.written, disk.room = 0, 0
    assert stage("infer", run_dir, *SHARDS) == 2
    line = _one_error_line(capsys, "infer")
    staging = run_dir / ".topk.staging"
    failed = f"{staging}/part-0000" if where == "replica" else f"{staging}/_SUCCESS"
    assert line.startswith(f"recllm infer: error: {failed}"), line
    assert "cannot write: No space left on device [ENOSPC]" in line
    assert line.endswith(f"nothing was published, {topk} is as it was"), line
    if where == "driver":
        assert disk.refused >= 1
    assert tree(topk) == previous
    assert _temporaries(run_dir) == []
    staged = sorted(p.name for p in staging.glob("part-*.parquet"))  # complete shards, kept for the rerun
    assert len(staged) == (1 if where == "replica" else 4), staged  # replica: shard 2 of 4 did not fit

    monkeypatch.undo()  # room again: the rerun adopts the staged shards and equals the uninterrupted run
    disk.room = None
    assert stage("infer", run_dir, *SHARDS) == 0
    assert _same_topk(tree(topk), reference)
    assert json.loads((topk / "_SUCCESS").read_text())["shards_computed"] == 4 - len(staged)
    assert not staging.exists() and _temporaries(run_dir) == []
