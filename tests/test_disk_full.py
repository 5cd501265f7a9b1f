"""A disk that fills up mid-stage: once a byte budget is spent, every write through the local filesystem (the
one all of storage.py's writers go through) raises OSError(ENOSPC) after writing what fitted. The budget is half
of what the stage wrote into its output when it last succeeded (the run_dir/config/ record a command writes after
its output is published is not counted), so the failure lands in its writing phase. Each stage must end
in one line naming the file, exit 2, its previous complete output byte for byte as it was and no temporary
left behind; with room again the same command succeeds with the same output."""

from __future__ import annotations

import errno
import shutil

import pytest
from fsspec.implementations.local import LocalFileOpener

from tests.toy_run import build_toy_run, comparable, stage, tree

OUTPUT = {"prepare": "dataset", "build-ids": "item_ids", "build-samples": "samples", "evaluate": "report"}


class Disk:
    """The local filesystem's writes, counted; with ``room`` set, full once that many bytes are written."""

    def __init__(self):
        self.room: int | None = None
        self.written = 0
        self.refused = 0
        self.output: str | None = None
        """Count (and budget) only writes into paths naming this stage output, when set."""

    def write(self, opener, data, *args, **kwargs):
        size = memoryview(data).nbytes
        if self.output is not None and self.output not in opener.path:
            return opener.f.write(data, *args, **kwargs)
        if self.room is not None and self.written + size > self.room:
            fits = max(self.room - self.written, 0)
            opener.f.write(memoryview(data).cast("B")[:fits])
            self.written += fits
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += size
        return opener.f.write(data, *args, **kwargs)


@pytest.fixture()
def disk(monkeypatch) -> Disk:
    disk = Disk()
    monkeypatch.setattr(LocalFileOpener, "write", lambda opener, data, *a, **k: disk.write(opener, data, *a, **k))
    return disk


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("disk_full"))


@pytest.fixture(scope="module")
def inferred(built, tmp_path_factory, ray_local):
    run_dir = shutil.copytree(built, tmp_path_factory.mktemp("disk_full_inferred") / "run")
    assert stage("infer", run_dir) == 0
    return run_dir


def _temporaries(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def _full_disk_keeps_the_previous_output(command: str, source, disk: Disk, tmp_path, capsys) -> None:
    run_dir = shutil.copytree(source, tmp_path / "run")
    extra = [f"data.path={source.parent / 'raw'}", "data.name=Toy"] if command == "prepare" else []
    output = run_dir / OUTPUT[command]

    disk.written, disk.output = 0, OUTPUT[command]
    assert stage(command, run_dir, *extra) == 0  # the previous complete output, and what it takes to write it
    previous, needed = tree(output), disk.written
    assert needed > 0 and previous

    disk.written, disk.room = 0, needed // 2
    capsys.readouterr()
    assert stage(command, run_dir, *extra) == 2
    assert disk.refused >= 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recllm ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"recllm {command}: error: {output}/")
    assert "cannot write: No space left on device [ENOSPC]" in lines[0]
    assert f"nothing was published, {output} is as it was" in lines[0]
    assert tree(output) == previous
    assert _temporaries(run_dir) == [] and not (run_dir / ".lock").exists()

    disk.room = None  # room again: the same command succeeds with the same output
    assert stage(command, run_dir, *extra) == 0
    assert comparable(tree(output)) == comparable(previous)


@pytest.mark.parametrize("command", ["prepare", "build-ids", "build-samples"])
def test_full_disk_mid_stage_keeps_the_previous_output(command, built, disk, tmp_path, capsys):
    _full_disk_keeps_the_previous_output(command, built, disk, tmp_path, capsys)


@pytest.mark.integration
def test_full_disk_mid_evaluate_keeps_the_previous_report(inferred, disk, tmp_path, capsys):
    _full_disk_keeps_the_previous_output("evaluate", inferred, disk, tmp_path, capsys)
