"""Stable assignment of users to shards: the same user lands in the same shard on every run and machine."""

from __future__ import annotations

import numpy as np


def user_shard(user_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """splitmix64 of the dense user_id, modulo the shard count."""
    x = np.asarray(user_ids, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int64)
