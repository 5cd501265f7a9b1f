"""New items (issue #26): `data.cold_items` holds a seeded fraction of the catalogue out of every train sequence and
history, keeping them as valid/test targets; evaluate scores each model on warm-target and cold-target users apart,
beside the TF-IDF content baseline."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.canonical import draw_cold_items, leave_last_out
from data_pipeline.config import DataConfig
from data_pipeline.prepare import run_prepare
from inference.evaluate import group_metrics
from launcher.cli import main
from ranking.content_baseline import content_topk, item_documents, tfidf_item_vectors
from tests.conftest import DEMO_DATA, REPO


def _rows(table: pa.Table) -> list[tuple]:
    return [(r["user_id"], r["history"], r["target"]) for r in table.to_pylist()]


def test_leave_last_out_drops_cold_items_from_train_and_histories_by_hand():
    cold = np.zeros(10, dtype=bool)
    cold[[3, 7]] = True
    seqs = {0: np.array([1, 3, 2, 7, 4]),  # valid target 7 is cold: the test history skips it
            1: np.array([3, 5, 6, 3]),      # test target 3 is cold and kept; the cold 3 in front is dropped
            2: np.array([3, 7, 8])}         # nothing warm before valid: no valid/test row, no train row
    out = leave_last_out(seqs, max_history=50, cold=cold)
    assert _rows(out["train"]) == [(0, [1], 2)]
    assert _rows(out["valid"]) == [(0, [1, 2], 7), (1, [5], 6)]
    assert _rows(out["test"]) == [(0, [1, 2], 4), (1, [5, 6], 3)]


def test_without_cold_items_the_split_is_unchanged():
    seqs = {u: np.random.default_rng(u).integers(0, 20, size=3 + u) for u in range(6)}
    assert all(a.equals(b) for a, b in zip(leave_last_out(seqs, 4).values(),
                                           leave_last_out(seqs, 4, cold=np.zeros(20, bool)).values()))


def test_cold_draw_is_seeded():
    a, b, c = draw_cold_items(1000, 0.1, 0), draw_cold_items(1000, 0.1, 0), draw_cold_items(1000, 0.1, 1)
    assert a.sum() == 100 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not draw_cold_items(1000, 0.0, 0).any() and draw_cold_items(5, 0.01, 0).sum() == 1


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cold")
    run_prepare(DataConfig(format="lcrec", path=str(DEMO_DATA), name="Scientific", cold_items=0.1), str(run_dir))
    return run_dir


def test_no_cold_item_enters_any_train_sequence_or_history(cold_run):
    dataset = cold_run / "dataset"
    items = pq.read_table(dataset / "items.parquet")
    cold = np.zeros(items.num_rows, dtype=bool)
    cold[items.column("item_id").to_numpy()] = items.column("cold").to_numpy(zero_copy_only=False)
    assert cold.sum() == round(0.1 * 4344)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"]["cold_items"] == cold.sum()
    tables = {s: pq.read_table(dataset / "sequences" / s) for s in ("train", "valid", "test")}
    for split, table in tables.items():
        history = np.concatenate([np.asarray(h, dtype=np.int64) for h in table.column("history").to_pylist()])
        assert not cold[history].any(), split
        assert all(len(h) for h in table.column("history").to_pylist()), split
    assert not cold[tables["train"].column("target").to_numpy()].any()
    for split in ("valid", "test"):  # cold items stay targets: the rows the cold report scores
        assert cold[tables[split].column("target").to_numpy()].sum() > 500


def test_cold_items_outside_leave_last_out_are_a_config_error(tmp_path, capsys):
    rc = main(["prepare", str(REPO / "configs" / "demo.yaml"), f"run_dir={tmp_path}", "data.cold_items=0.1",
               "data.split=global_time"])
    assert rc == 2 and "cold_items: 0.1 needs split leave_last_out" in capsys.readouterr().err
    assert main(["prepare", str(REPO / "configs" / "demo.yaml"), f"run_dir={tmp_path}", "data.cold_items=1.5"]) == 2
    assert not (tmp_path / "dataset").exists()


def test_group_rows_average_over_their_own_users_only():
    cold = np.array([False, False, True, True])
    targets = np.array([0, 2, 3, 1])  # users 0 and 3: warm targets; users 1 and 2: cold targets
    lists = {"m": np.array([[0, 1], [0, 1], [3, 0], [2, 0]])}  # hits: user 0 at rank 1, user 2 at rank 1
    groups = group_metrics(lists, targets, 4, [1, 2], cold)
    assert groups["warm"]["users"] == 2 and groups["cold"]["users"] == 2
    assert groups["warm"]["models"]["m"]["HR@1"] == 0.5 and groups["cold"]["models"]["m"]["HR@1"] == 0.5
    assert groups["warm"]["models"]["m"]["HR@2"] == 0.5  # user 3's target 1 is not in [2, 0]
    assert groups["cold"]["models"]["m"]["NDCG@2"] == pytest.approx(0.5)


def test_content_baseline_ranks_by_cosine_with_the_recent_history_by_hand():
    docs = item_documents({"title": ["red guitar strings", "blue guitar", "drum sticks", None, "red drum"]},
                          ["title"])
    assert docs[3] == ""
    vectors = tfidf_item_vectors(docs)
    dense = vectors.toarray()
    # history [0, 4], last 2 items: the query is their mean vector; history items are excluded.
    query = (dense[0] + dense[4]) / 2
    expected = dense @ query / (np.linalg.norm(dense, axis=1) * np.linalg.norm(query) + 1e-12)
    expected[[0, 4]] = -np.inf
    top = content_topk(vectors, [[0, 4]], k=3, recent=2)
    assert top[0].tolist() == np.argsort(-expected, kind="stable")[:3].tolist()
    assert top[0][0] in (1, 2) and 3 in top[0]  # a text-less item scores 0 but is still rankable
    # recent=1 reads only the last history item ("red drum"): "drum sticks" wins.
    assert content_topk(vectors, [[0, 4]], k=1, recent=1)[0].tolist() == [2]


def test_content_baseline_ranks_items_no_interaction_ever_named():
    docs = ["solder wire", "soldering iron tip", "microscope slide", "glass microscope slides"]
    top = content_topk(tfidf_item_vectors(docs), [[2]], k=1)
    assert top.tolist() == [[3]]


def test_evaluate_reports_warm_and_cold_rows_and_the_content_baseline(cold_run, capsys):
    test = pq.read_table(cold_run / "dataset" / "sequences" / "test").sort_by("user_id")
    (cold_run / "topk").mkdir(exist_ok=True)
    lists = [list(range(20))] * test.num_rows  # the same 20 items for everyone: a most-popular stand-in
    pq.write_table(pa.table({"user_id": test.column("user_id"), "item_ids": lists}), cold_run / "topk" / "p.parquet")
    (cold_run / "topk" / "_SUCCESS").write_text(json.dumps({"mode": "test", "scorer": "multinomial", "top_k": 20}))
    assert main(["evaluate", str(REPO / "configs" / "demo.yaml"), f"run_dir={cold_run}", "eval.baseline=false"]) == 0
    report = json.loads((cold_run / "report" / "metrics.json").read_text())
    assert set(report["models"]) == {"recllm", "popular", "content"}
    groups = report["groups"]
    assert groups["warm"]["users"] + groups["cold"]["users"] == report["users"] == test.num_rows
    assert set(groups["cold"]["models"]) == {"recllm", "popular", "content"}
    # popular never ranks a cold item (none is in any train sequence); text reaches some
    assert groups["cold"]["models"]["popular"]["HR@20"] == 0.0
    assert groups["cold"]["models"]["content"]["HR@20"] > 0.05
    assert "| cold (" in (cold_run / "report" / "report.md").read_text()
