"""Streaming reader throughput vs a plain pyarrow scan of the same files, side by side in one run.

Writes a synthetic canonical `sequences/train` folder (ROWS rows, histories of 1..50 items, the
shard/row-group layout `prepare` writes), then reads it (1) with pyarrow.ParquetFile.iter_batches and
(2) with ShardedParquetStream through Ray Data (shuffled, one worker's stream = the whole epoch),
and prints samples/s of both and their ratio (goal >= 0.5).
Usage: python bench/loader.py [--rows 2000000] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import storage  # noqa: E402
from data_pipeline.canonical import SEQUENCE_SCHEMA  # noqa: E402
from data_pipeline.run_layout import sequences_dir  # noqa: E402
from data_pipeline.sharding import user_shard  # noqa: E402
from data_pipeline.streaming_reader import ShardedParquetStream  # noqa: E402


def write_synthetic(folder: str, rows: int, shards: int, row_group_size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 51, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 50_000, offsets[-1])
    users = rng.integers(0, rows // 8, rows)
    table = pa.table({"user_id": pa.array(users, pa.int64()),
                      "history": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64())),
                      "target": pa.array(rng.integers(0, 50_000, rows), pa.int64())}).cast(SEQUENCE_SCHEMA)
    shard = user_shard(table.column("user_id").to_numpy(), shards)
    os.makedirs(folder, exist_ok=True)
    for k in range(shards):
        pq.write_table(table.filter(pa.array(shard == k)), os.path.join(folder, f"part-{k:05d}.parquet"),
                       row_group_size=row_group_size, compression="zstd")


def raw_scan(folder: str, batch_size: int) -> int:
    n = 0
    for f in storage.list_files(folder, ".parquet"):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            n += batch.num_rows
    return n


def stream(folder: str, batch_size: int, use_ray: bool) -> int:
    n = 0
    for batch in ShardedParquetStream(folder, 0, 1, batch_size, seed=0, use_ray=use_ray):
        n += batch.num_rows
    return n


def timed(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--row-group-size", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = sequences_dir(tmp, "train")  # tmp plays a run's dataset/
        write_synthetic(folder, args.rows, 4, args.row_group_size)
        stream(folder, args.batch_size, True)  # warm the Ray Data workers once
        results = {}
        for name, fn, extra in (("pyarrow scan", raw_scan, ()), ("streaming reader (Ray Data)", stream, (True,)),
                                ("streaming reader (in-process)", stream, (False,))):
            best = min((timed(fn, folder, args.batch_size, *extra) for _ in range(args.repeats)), key=lambda r: r[1])
            results[name] = best
            print(f"{name:32s} {best[0]:>10,d} rows  {best[1]:7.2f} s  {best[0] / best[1]:>12,.0f} samples/s")
    base = results["pyarrow scan"][0] / results["pyarrow scan"][1]
    ours = results["streaming reader (Ray Data)"][0] / results["streaming reader (Ray Data)"][1]
    print(f"ratio streaming reader (Ray Data) / pyarrow scan: {ours / base:.2f}x (goal >= 0.5x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
