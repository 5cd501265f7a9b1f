"""Bad input past `prepare`: a missing or corrupt stage input ends in one line naming the file, exit 2, no partial
output and no lock left behind; --debug adds the traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.cli import main
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "demo.yaml")
SEQUENCES = {str(u): [(u + k) % 12 for k in range(5)] for u in range(30)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared 30-user catalogue (run_dir/dataset only); each test works on its own copy."""
    root = tmp_path_factory.mktemp("bad_stage")
    (root / "raw").mkdir()
    (root / "raw" / "Toy.inter.json").write_text(json.dumps(SEQUENCES))
    assert main(["prepare", CONFIG, f"run_dir={root / 'run'}", f"data.path={root / 'raw'}", "data.name=Toy"]) == 0
    return root / "run"


@pytest.fixture()
def run_dir(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "run")


def _fails_cleanly(capsys, run_dir, argv, *needles, absent=()):
    assert main([argv[0], CONFIG, f"run_dir={run_dir}", *argv[1:]]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("recllm ")]
    assert len(lines) == 1 and lines[0].startswith(f"recllm {argv[0]}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for folder in absent:
        assert not (run_dir / folder).exists(), folder
    assert not (run_dir / ".lock").exists()
    return lines[0]


def test_train_without_item_ids(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["train"], str(run_dir / "item_ids" / "tokens.json"),
                   "run `recllm build-ids` first", absent=["model"])


def test_infer_without_a_model(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["infer"], str(run_dir / "model"), "run `recllm train` first", absent=["topk"])


def test_evaluate_without_a_topk(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["evaluate"], "topk/_SUCCESS", "run `recllm infer` first", absent=["report"])


def test_build_ids_semantic_without_a_baseline(run_dir, capsys):
    semantic = ["ids.scheme=semantic", "ids.user_tokens=true", "infer.scorer=beam"]
    _fails_cleanly(capsys, run_dir, ["build-ids", *semantic], str(run_dir / "baseline" / "manifest.json"),
                   "no baseline; run `recllm train-baseline` first", absent=["item_ids"])


def test_train_baseline_without_a_dataset(tmp_path, capsys):
    _fails_cleanly(capsys, tmp_path / "run", ["train-baseline"], "dataset/manifest.json", "run `recllm prepare` first",
                   absent=["baseline"])


def test_build_samples_without_item_ids(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["build-samples"], "item_codes.parquet", "run `recllm build-ids` first",
                   absent=["samples"])


def test_build_samples_with_corrupt_item_codes(run_dir, capsys):
    (run_dir / "item_ids").mkdir()
    (run_dir / "item_ids" / "item_codes.parquet").write_bytes(b"PAR1 not really")
    _fails_cleanly(capsys, run_dir, ["build-samples"], "item_codes.parquet", "corrupt or unreadable Parquet",
                   absent=["samples"])


def test_build_ids_with_corrupt_items_table(run_dir, capsys):
    (run_dir / "dataset" / "items.parquet").write_bytes(b"truncated")
    _fails_cleanly(capsys, run_dir, ["build-ids", "ids.scheme=atomic"], "dataset/items.parquet",
                   "corrupt or unreadable Parquet", absent=["item_ids"])


def test_debug_adds_the_traceback(run_dir, capsys):
    assert main(["train", CONFIG, f"run_dir={run_dir}", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "training_inputs" in err
    assert err.rstrip().splitlines()[-1].startswith("recllm train: error: ")


def test_unknown_flag_prints_the_usage(run_dir, capsys):
    assert main(["train", CONFIG, f"run_dir={run_dir}", "--force"]) == 2
    assert capsys.readouterr().err.startswith("usage: recllm <command> CONFIG")
