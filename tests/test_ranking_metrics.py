"""Full-ranking metrics: hand-computed cases, and the vectorised code against a plain loop on random lists."""

import math

import numpy as np
import pytest

from ranking.ranking_metrics import catalogue_coverage, hit_rate_at_k, ndcg_at_k, ranking_metrics

# Targets sit at 0-based rank 1, rank 2, and nowhere.
TOPK = np.array([[3, 1, 2], [5, 6, 7], [9, 8, 0]])
TARGETS = np.array([1, 7, 4])


def test_hit_rate_by_hand():
    assert hit_rate_at_k(TOPK, TARGETS, 1) == 0.0
    assert hit_rate_at_k(TOPK, TARGETS, 2) == pytest.approx(1 / 3)
    assert hit_rate_at_k(TOPK, TARGETS, 3) == pytest.approx(2 / 3)


def test_ndcg_by_hand():
    assert ndcg_at_k(TOPK, TARGETS, 1) == 0.0
    assert ndcg_at_k(TOPK, TARGETS, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert ndcg_at_k(TOPK, TARGETS, 3) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_hit_at_first_place_scores_one():
    topk = np.array([[4, 0], [2, 4]])
    assert ndcg_at_k(topk, np.array([4, 2]), 2) == 1.0
    assert hit_rate_at_k(topk, np.array([4, 2]), 1) == 1.0


def test_ranking_metrics_keys_and_values():
    topk = np.tile(np.arange(20), (2, 1))
    metrics = ranking_metrics(topk, np.array([0, 7]))
    assert list(metrics) == ["HR@1", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
    assert metrics["HR@1"] == 0.5 and metrics["HR@5"] == 0.5 and metrics["HR@10"] == 1.0
    assert metrics["NDCG@5"] == pytest.approx(0.5)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(9)) / 2)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="exceeds"):
        hit_rate_at_k(TOPK, TARGETS, 4)
    with pytest.raises(ValueError, match="targets"):
        ndcg_at_k(TOPK, TARGETS[:2], 2)
    with pytest.raises(ValueError, match="topk"):
        hit_rate_at_k(TOPK[0], TARGETS, 1)


def test_catalogue_coverage():
    assert catalogue_coverage(np.array([[0, 1], [1, 2]]), 10) == pytest.approx(0.3)
    assert catalogue_coverage(np.array([[0, -1], [-1, -1]]), 4) == pytest.approx(0.25)  # -1 fills are not items
    with pytest.raises(ValueError):
        catalogue_coverage(TOPK, 0)


def _reference(topk, targets, k):
    hits, gains = 0.0, 0.0
    for row, target in zip(topk, targets):
        for rank, item in enumerate(row[:k]):
            if item == target:
                hits += 1
                gains += 1 / math.log2(rank + 2)
                break
    return hits / len(targets), gains / len(targets)


def test_matches_plain_loop_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = int(rng.integers(1, 50))
        topk = np.stack([rng.permutation(30)[:20] for _ in range(rows)])
        targets = rng.integers(0, 30, rows)
        for k in (1, 3, 10, 20):
            hr, ndcg = _reference(topk, targets, k)
            assert hit_rate_at_k(topk, targets, k) == pytest.approx(hr)
            assert ndcg_at_k(topk, targets, k) == pytest.approx(ndcg)


def test_most_popular_counts_each_users_train_interactions_once():
    import pyarrow as pa

    from inference.evaluate import most_popular

    # user 0 has two train rows (prefixes): only the longest counts, so item 1 is not counted twice.
    train = pa.table({"user_id": [0, 0, 1, 2], "history": [[1], [1, 2], [3], [3, 4]], "target": [2, 5, 5, 5]})
    assert most_popular(train, 3).tolist() == [5, 3, 1]
