"""The streaming reader: ranks partition an epoch, order is fixed by (seed, epoch), and a resumed
stream yields exactly the rows an interrupted one had not."""

from __future__ import annotations

import pytest

from data_pipeline.streaming_reader import ShardedParquetStream

pytestmark = pytest.mark.integration


def _rows(batches):
    out = []
    for b in batches:
        out += zip(b.column("user_id").to_pylist(), b.column("target").to_pylist(),
                   map(tuple, b.column("history").to_pylist()))
    return out


@pytest.fixture(scope="module")
def train_uri(demo_dataset):
    return str(demo_dataset / "sequences" / "train")


def test_ranks_partition_one_epoch_deterministically(ray_local, train_uri):
    import pyarrow.parquet as pq

    all_rows = _rows([pq.read_table(train_uri)])
    ranks = [_rows(ShardedParquetStream(train_uri, r, 2, 512, seed=7)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(all_rows) // 2
    union = ranks[0] + ranks[1]
    assert len(set(union)) == len(union)  # rows are unique in this split, so no duplicates
    assert set(union) <= set(all_rows) and len(set(all_rows) - set(union)) == len(all_rows) % 2
    again = [_rows(ShardedParquetStream(train_uri, r, 2, 512, seed=7)) for r in range(2)]
    assert again == ranks  # same seed and epoch: same order
    other = ShardedParquetStream(train_uri, 0, 2, 512, seed=7)
    other.set_epoch(1)
    assert _rows(other) != ranks[0]  # a new epoch reshuffles


def test_ray_path_equals_plain_path(ray_local, train_uri):
    ray_rows = _rows(ShardedParquetStream(train_uri, 1, 2, 300, seed=3))
    plain_rows = _rows(ShardedParquetStream(train_uri, 1, 2, 300, seed=3, use_ray=False))
    assert ray_rows == plain_rows


@pytest.mark.parametrize("stop_after", [1, 17, 40])
def test_resume_mid_epoch_sees_exactly_the_rest(ray_local, train_uri, stop_after):
    full = _rows(ShardedParquetStream(train_uri, 0, 2, 256, seed=11))
    first = ShardedParquetStream(train_uri, 0, 2, 256, seed=11)
    seen = []
    for i, batch in enumerate(first):
        seen += _rows([batch])
        if i + 1 == stop_after:
            break
    state = first.state_dict()
    assert state["rows_consumed"] == len(seen)
    resumed = ShardedParquetStream(train_uri, 0, 2, 256, seed=11)
    resumed.load_state_dict(state)
    rest = _rows(resumed)
    assert seen + rest == full
    assert not set(seen) & set(rest)


def test_state_from_another_layout_is_refused(ray_local, train_uri):
    state = ShardedParquetStream(train_uri, 0, 2, 256, seed=11).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShardedParquetStream(train_uri, 0, 4, 256, seed=11).load_state_dict(state)
