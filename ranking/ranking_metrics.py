"""Full-ranking metrics from top-K recommendation lists: hit rate, NDCG and catalogue coverage.

Every recommender (SASRec baseline, the fine-tuned LLM) writes top-K item lists; these functions
turn them into the numbers the evaluation reports. One relevant item per row (leave-last-out).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def _target_ranks(topk: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """0-based rank of each row's target within its first ``k`` entries; -1 where it is absent."""
    topk = np.asarray(topk)
    targets = np.asarray(targets)
    if topk.ndim != 2:
        raise ValueError(f"topk must be [rows, K], got shape {topk.shape}")
    if targets.shape != (topk.shape[0],):
        raise ValueError(f"targets must be [rows] = [{topk.shape[0]}], got shape {targets.shape}")
    if k > topk.shape[1]:
        raise ValueError(f"k={k} exceeds the {topk.shape[1]} items per top-K list")
    hits = topk[:, :k] == targets[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def hit_rate_at_k(topk: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among their first ``k`` recommendations."""
    ranks = _target_ranks(topk, targets, k)
    return float((ranks >= 0).mean()) if len(ranks) else 0.0


def ndcg_at_k(topk: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item: 1 / log2(rank + 2) for a hit at 0-based rank, else 0."""
    ranks = _target_ranks(topk, targets, k)
    if not len(ranks):
        return 0.0
    gains = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return float(gains.mean())


def ranking_metrics(topk: np.ndarray, targets: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """{"HR@k": ..., "NDCG@k": ...} for every k; NDCG@1 equals HR@1 and is left out."""
    ks = sorted(set(ks))
    out = {f"HR@{k}": hit_rate_at_k(topk, targets, k) for k in ks}
    out.update({f"NDCG@{k}": ndcg_at_k(topk, targets, k) for k in ks if k > 1})
    return out


def catalogue_coverage(topk: np.ndarray, num_items: int) -> float:
    """Fraction of the catalogue's ``num_items`` items that appear in at least one top-K list."""
    if num_items <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    ids = np.asarray(topk).ravel()
    ids = ids[(ids >= 0) & (ids < num_items)]
    return float(np.unique(ids).size / num_items)
