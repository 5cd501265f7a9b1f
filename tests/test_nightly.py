"""The nightly job as scheduled: the command on the first line of configs/nightly.yaml, run twice in a row on a
real slice of the shipped data with a trained run's item_ids/ and model/ published next to it (as the config's
header says), writes the same files both times and scores nobody the second time."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from launcher.cli import main
from tests.conftest import REPO
from tests.test_infer_integration import _args, prepared_slice_run

pytestmark = pytest.mark.integration

NIGHTLY = REPO / "configs" / "nightly.yaml"
USERS = 150
PER_RUN = {"created", "seconds", "users_per_second", "shards_computed", "users_scored", "users_reused"}
"""Manifest fields about the run rather than its output (when, how fast, how much it had to score): the only
ones allowed to differ between two runs."""


def _nightly_command(run_dir: Path, raw: Path) -> list[str]:
    """The first line of the config, with only where-to-read/write and small-run sizes overridden."""
    command, *argv = shlex.split(NIGHTLY.read_text().splitlines()[0].lstrip("# "))
    assert command == "recllm" and argv[1] == "configs/nightly.yaml"
    return [argv[0], str(REPO / argv[1]), *argv[2:], f"run_dir={run_dir}", f"data.path={raw}",
            "infer.users_per_shard=64", "infer.top_k=5", "infer.num_beams=5"]


def _files(run_dir: Path) -> dict[str, object]:
    """Every file the nightly job writes: bytes for data, manifests without their PER_RUN fields."""
    out: dict[str, object] = {}
    for folder in ("dataset", "topk"):
        for path in sorted((run_dir / folder).rglob("*")):
            if path.is_file():
                if path.suffix == ".json" or path.name == "_SUCCESS":
                    out[str(path.relative_to(run_dir))] = {k: v for k, v in json.loads(path.read_text()).items()
                                                           if k not in PER_RUN}
                else:
                    out[str(path.relative_to(run_dir))] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ray_local):
    """A run's item_ids/ and an (untrained) exported model/, as `recllm train` leaves them."""
    return prepared_slice_run(tmp_path_factory.mktemp("nightly"), USERS)


def test_nightly_command_twice_writes_identical_files_and_recomputes_nothing(trained_run, tmp_path):
    train_run, raw = trained_run
    night = tmp_path / "nightly"
    night.mkdir()
    for name in ("item_ids", "model"):  # the publishing step of the config's header
        os.symlink(train_run / name, night / name)
    command = _nightly_command(night, raw)

    assert main(command) == 0
    first = json.loads((night / "topk" / "_SUCCESS").read_text())
    assert first["mode"] == "nightly" and first["users"] == USERS
    assert first["users_scored"] == USERS and first["shards_computed"] == len(first["shards"]) == 3
    files = _files(night)
    assert sum(name.startswith("topk/part-") for name in files) == 3

    assert main(command) == 0
    second = json.loads((night / "topk" / "_SUCCESS").read_text())
    assert second["shards_computed"] == 0 and second["users_scored"] == 0
    assert _files(night) == files
    assert not [p.name for p in (night / "topk").iterdir() if ".tmp-" in p.name]
