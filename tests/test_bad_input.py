"""Bad input: one clear error naming file, row and field; exit code 2; no partial dataset/ left behind."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.cli import main
from tests.conftest import REPO

CSV_HEADER = "reviewerID,asin,reviewerName,helpful,reviewText,overall,summary,unixReviewTime,reviewTime\n"


def _lcrec(folder, inter, items=None, name="Toy"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter.json").write_text(json.dumps(inter))
    if items is not None:
        (folder / f"{name}.item.json").write_text(json.dumps(items))


def _run(tmp_path, raw, *overrides):
    run_dir = tmp_path / "run"
    rc = main(["prepare", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={run_dir}", f"data.path={raw}", *overrides])
    return rc, run_dir


def _assert_failed_cleanly(rc, run_dir, capsys, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert needle in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (run_dir / "dataset").exists()
    assert not run_dir.exists() or not any(p.name.startswith(".dataset.tmp") for p in run_dir.iterdir())


GOOD_SEQ = {"0": [0, 1, 2], "1": [1, 2, 0]}
GOOD_ITEMS = {str(i): {"title": f"item {i}"} for i in range(3)}


def test_missing_file(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.inter.json", "file not found")


def test_missing_column(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text("reviewerID,asin,unixReviewTime\nu1,i1,100\n")
    rc, run_dir = _run(tmp_path, raw, "data.format=amazon_reviews", "data.name=")
    _assert_failed_cleanly(rc, run_dir, capsys, "r.csv", "missing column", "'overall'")


def test_null_item_id(tmp_path, capsys):
    _lcrec(tmp_path / "raw", {"0": [0, None, 2]}, GOOD_ITEMS)
    rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.inter.json", "user '0' position 1", "'item'", "null")


def test_null_user_id_in_reviews(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text(CSV_HEADER + 'u1,i1,a,"[0, 0]",ok,5,s,100,x\n,i2,b,"[0, 0]",ok,4,s,101,x\n')
    rc, run_dir = _run(tmp_path, raw, "data.format=amazon_reviews", "data.name=")
    _assert_failed_cleanly(rc, run_dir, capsys, "r.csv, row 3", "'reviewerID'", "null")


def test_non_integer_id(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Toy.txt").write_text("1 1\n1 2\n1 abc\n")
    rc, run_dir = _run(tmp_path, raw, "data.format=sasrec", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.txt, line 3", "'item'", "'abc' is not an integer")


def test_history_item_absent_from_catalogue(tmp_path, capsys):
    _lcrec(tmp_path / "raw", {"0": [0, 1, 2], "1": [1, 7, 0]}, GOOD_ITEMS)
    rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.inter.json", "user '1' position 1", "item 7 is not in the catalogue",
                           "Toy.item.json")


def test_users_with_too_few_interactions_are_dropped_and_counted(tmp_path, caplog):
    _lcrec(tmp_path / "raw", {"0": [0, 1, 2, 0], "1": [1, 2], "2": [2, 0, 1, 2, 1]}, GOOD_ITEMS)
    with caplog.at_level(logging.INFO, logger="recllm.data"):
        rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy", "data.min_user_interactions=3")
    assert rc == 0
    man = json.loads((run_dir / "dataset" / "manifest.json").read_text())
    assert man["counts"]["users"] == 2 and man["counts"]["dropped_users"] == 1
    assert "dropped 1 users with fewer than 3 interactions" in caplog.text


def test_invalid_utf8(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Toy.txt").write_bytes(b"1 1\n1 2\n2 \xff\xfe\n")
    rc, run_dir = _run(tmp_path, raw, "data.format=sasrec", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.txt, line 3", "invalid UTF-8")


def test_corrupt_parquet(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "interactions.parquet").write_bytes(b"PAR1 this is not parquet at all")
    rc, run_dir = _run(tmp_path, raw, "data.format=parquet")
    _assert_failed_cleanly(rc, run_dir, capsys, "interactions.parquet", "corrupt or unreadable Parquet")


def test_rating_out_of_range(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "r.csv").write_text(CSV_HEADER + 'u1,i1,a,"[0, 0]",ok,5,s,100,x\nu2,i2,b,"[0, 0]",ok,7,s,101,x\n')
    rc, run_dir = _run(tmp_path, raw, "data.format=amazon_reviews", "data.name=")
    _assert_failed_cleanly(rc, run_dir, capsys, "r.csv, row 3", "'overall'", "rating 7.0 outside [1.0, 5.0]")


def test_rating_out_of_range_in_parquet_logs(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "rating": [4.0, 0.0, 3.0]}),
                   raw / "interactions.parquet")
    rc, run_dir = _run(tmp_path, raw, "data.format=parquet")
    _assert_failed_cleanly(rc, run_dir, capsys, "interactions.parquet, row 1", "'rating'", "outside")


def test_empty_dataset(tmp_path, capsys):
    _lcrec(tmp_path / "raw", {})
    rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    _assert_failed_cleanly(rc, run_dir, capsys, "Toy.inter.json", "empty dataset")


def test_a_failed_run_keeps_the_previous_dataset_intact(tmp_path, capsys):
    _lcrec(tmp_path / "raw", GOOD_SEQ, GOOD_ITEMS)
    rc, run_dir = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    assert rc == 0
    before = (run_dir / "dataset" / "manifest.json").read_text()
    (tmp_path / "raw" / "Toy.inter.json").write_text('{"0": [0, "x"]}')
    rc, _ = _run(tmp_path, tmp_path / "raw", "data.name=Toy")
    assert rc == 2 and (run_dir / "dataset" / "manifest.json").read_text() == before


def test_own_parquet_logs_round_trip(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"user_id": ["a", "a", "a", "b", "b", "b"], "item_id": [10, 11, 12, 12, 10, 11],
                             "timestamp": [3, 1, 2, 5, 6, 4]}), raw / "interactions.parquet")
    pq.write_table(pa.table({"item_id": [10, 11, 12], "title": ["x", "y", "z"]}), raw / "items.parquet")
    rc, run_dir = _run(tmp_path, raw, "data.format=parquet")
    assert rc == 0
    test = pq.read_table(run_dir / "dataset" / "sequences" / "test").to_pylist()
    # user a in time order: 11, 12, 10 -> dense 1, 2, 0; user b: 11, 12, 10 as well
    assert [(r["history"], r["target"]) for r in sorted(test, key=lambda r: r["user_id"])] == [([1, 2], 0), ([1, 2], 0)]
