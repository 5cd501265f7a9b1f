"""prepare: the canonical dataset reproduces the published counts and the split rules."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.prepare import run_prepare
from data_pipeline.sharding import user_shard
from launcher.cli import main
from tests.conftest import DEMO_DATA, REPO, shared_dataset


def _manifest(run_dir):
    return json.loads((run_dir / "dataset" / "manifest.json").read_text())


def test_demo_config_on_scientific_gives_published_counts(tmp_path):
    assert main(["prepare", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={tmp_path}"]) == 0
    c = _manifest(tmp_path)["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (8317, 4344, 58492)
    assert c["test_rows"] == c["users"] == c["valid_rows"]
    test = pq.read_table(tmp_path / "dataset" / "sequences" / "test")
    assert test.num_rows == 8317 and len(set(test.column("user_id").to_pylist())) == 8317
    items = pq.read_table(tmp_path / "dataset" / "items.parquet")
    assert items.column("title").null_count == 0  # every Scientific item has a title


def test_leave_last_out_rows_match_the_raw_sequence(demo_dataset):
    raw = json.loads((DEMO_DATA / "Scientific.inter.json").read_text())
    tables = {s: pq.read_table(demo_dataset / "sequences" / s).to_pylist() for s in ("train", "valid", "test")}
    by_user = {s: {} for s in tables}
    for s, rows in tables.items():
        for r in rows:
            by_user[s].setdefault(r["user_id"], []).append(r)
    for user in ("0", "3", "8000"):
        seq, u = raw[user], int(user)
        assert by_user["test"][u][0]["target"] == seq[-1] and by_user["test"][u][0]["history"] == seq[:-1][-50:]
        assert by_user["valid"][u][0]["target"] == seq[-2] and by_user["valid"][u][0]["history"] == seq[:-2][-50:]
        train = sorted(by_user["train"][u], key=lambda r: len(r["history"]))
        assert [r["target"] for r in train] == seq[1:-2]


def test_shards_follow_the_stable_user_hash(demo_dataset):
    for k in range(4):
        part = pq.read_table(demo_dataset / "interactions" / f"part-{k:05d}.parquet")
        assert set(user_shard(part.column("user_id").to_numpy(), 4).tolist()) <= {k}
    man = json.loads((demo_dataset / "manifest.json").read_text())
    assert man["schema_version"] == 1 and len(man["files"]) == 2 + 4 * 4
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())


def test_global_time_split_needs_timestamps(tmp_path):
    rc = main(["prepare", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={tmp_path}", "data.split=global_time"])
    assert rc == 2 and not (tmp_path / "dataset").exists()


def test_global_time_split_on_reviews(tmp_path):
    path = shared_dataset("musical_instruments_reviews_partial")
    cfg = DataConfig(format="amazon_reviews", path=str(path), split="global_time")
    man = run_prepare(cfg, str(tmp_path))
    c = man["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (1381, 392, 5050)
    inter = pq.read_table(tmp_path / "dataset" / "interactions").to_pandas().sort_values(["user_id", "position"])
    t_valid, t_test = np.quantile(inter["timestamp"].to_numpy(), [0.8, 0.9])
    test = {r["user_id"]: r for r in pq.read_table(tmp_path / "dataset" / "sequences" / "test").to_pylist()}
    valid = {r["user_id"]: r for r in pq.read_table(tmp_path / "dataset" / "sequences" / "valid").to_pylist()}
    for user, group in inter.groupby("user_id"):
        items, stamps = group["item_id"].tolist(), group["timestamp"].to_numpy()
        later = np.nonzero(stamps >= t_test)[0]
        if len(later) and later[0] > 0:  # a test row: the first test-period item, with everything before it
            assert test[user]["target"] == items[later[0]] and test[user]["history"] == items[:later[0]][-50:]
        else:
            assert user not in test
        mid = np.nonzero((stamps >= t_valid) & (stamps < t_test))[0]
        assert (user in valid) == bool(len(mid) and mid[0] > 0)
    assert 0 < c["test_rows"] < c["users"]


@pytest.mark.parametrize("folder,fmt,name,expect", [
    ("instruments_lcrec", "lcrec", "Instruments", (24772, 9922, 206153)),
    ("video_games_sasrec", "sasrec", "Video", (31013, 23715, 287107)),
])
def test_other_shared_datasets_without_code_change(tmp_path, folder, fmt, name, expect):
    path = shared_dataset(folder)
    rc = main(["prepare", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={tmp_path}", f"data.path={path}",
               f"data.name={name}", f"data.format={fmt}"])
    assert rc == 0
    c = _manifest(tmp_path)["counts"]
    assert (c["users"], c["items"], c["interactions"]) == expect
