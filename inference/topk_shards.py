"""The top-K cache layout and its bookkeeping: which users to score, in which shard, and which shards are
already complete. A shard is one Parquet file written under a temporary name and renamed; `_SUCCESS` closes
a run. A run writes its shards into a hidden staging folder beside topk/ (``staging_dir``) and swaps it in
whole once `_SUCCESS` is there, so topk/ is always the last complete run: a killed or failed run leaves it as
it was. Re-running adopts every staged or published shard whose inputs are unchanged (its fingerprint), so a
crashed run resumes with identical output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.run_layout import RunLayout

SUCCESS = "_SUCCESS"
TOPK_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())),
                         ("scores", pa.list_(pa.float32())), ("history_hash", pa.string()),
                         ("model_version", pa.string())])


@dataclass
class UserHistories:
    """Users sorted by id with their histories as one flat array (offsets), so a million users stay small."""

    user_ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    def history(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def slice(self, lo: int, hi: int) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.user_ids[lo:hi], [self.history(i) for i in range(lo, hi)]


@dataclass
class ShardTask:
    shard: int
    lo: int
    hi: int
    """Rows [lo, hi) of UserHistories."""
    fingerprint: str
    """Hash of the shard's inputs (users, histories, model version, settings)."""


def history_hash(history) -> str:
    return hashlib.sha1(np.asarray(history, dtype=np.int64).tobytes()).hexdigest()[:16]


def _from_table(table: pa.Table) -> UserHistories:
    table = table.sort_by("user_id")
    hist = table.column("history").combine_chunks()
    return UserHistories(table.column("user_id").to_numpy(), hist.offsets.to_numpy().astype(np.int64),
                         hist.values.to_numpy().astype(np.int64))


def users_to_score(run_dir: str, mode: str) -> UserHistories:
    """test: the test rows' histories; nightly: every user's full history."""
    layout = RunLayout(run_dir)
    if mode == "test":
        test = layout.read_sequences("test", columns=["user_id", "history"])
        users = _from_table(test)
        del test
    else:
        inter = storage.read_parquet(layout.interactions, columns=["user_id", "item_id", "position"])
        inter = inter.sort_by([("user_id", "ascending"), ("position", "ascending")])
        ids = inter.column("user_id").to_numpy()
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        offsets = np.append(starts, len(ids)).astype(np.int64)
        users = UserHistories(ids[starts], offsets, inter.column("item_id").to_numpy().astype(np.int64))
        del inter, ids
    # The read and the sort leave several times the histories' size cached in Arrow's allocator (~0.4 GB at
    # 1M users) for the rest of the job; hand it back.
    pa.default_memory_pool().release_unused()
    return users


def recent_users(run_dir: str, since: int) -> set[int]:
    """Users with an interaction at or after ``since`` (unix time)."""
    layout = RunLayout(run_dir)
    inter = storage.read_parquet(layout.interactions, columns=["user_id", "timestamp"])
    if inter.column("timestamp").null_count:
        raise DataError(layout.dataset, "infer.since needs timestamps; this dataset has only the order of interactions",
                        field="timestamp")
    return set(pc.unique(inter.filter(pc.greater_equal(inter.column("timestamp"), since)).column("user_id")).to_pylist())


def plan_shards(users: UserHistories, users_per_shard: int, salt: str) -> list[ShardTask]:
    """Shard k holds user_ids in [k * users_per_shard, (k+1) * users_per_shard): stable as users come and go."""
    if not len(users):
        return []
    shard_of = users.user_ids // users_per_shard
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.append(bounds, len(users))
    tasks = []
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        digest = hashlib.sha256(salt.encode())
        digest.update(users.user_ids[lo:hi].tobytes())
        digest.update(users.values[users.offsets[lo]:users.offsets[hi]].tobytes())
        digest.update(np.diff(users.offsets[lo:hi + 1]).tobytes())
        tasks.append(ShardTask(int(shard_of[lo]), lo, hi, digest.hexdigest()[:24]))
    return tasks


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def complete_shards(topk_dir: str) -> dict[int, str]:
    """shard -> fingerprint of every shard file present (complete by construction: written then renamed)."""
    out = {}
    for uri in storage.list_files(topk_dir, ".parquet"):
        name = uri.rsplit("/", 1)[-1]
        if not name.startswith("part-"):
            continue
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        fingerprint = meta.get(b"recllm_fingerprint")
        if fingerprint:
            out[int(name[5:10])] = fingerprint.decode()
    return out


def staging_dir(topk_dir: str) -> str:
    """Where a run writes its shards before publishing: ``.topk.staging`` beside topk/. Its name is fixed (not
    per process) so the next run finds a killed run's finished shards; every shard carries its fingerprint,
    so one is adopted only where its users, histories, model and settings are the ones asked for now."""
    parent, name = posixpath.split(topk_dir.rstrip("/"))
    return posixpath.join(parent, f".{name}.staging")


def adopt_shard(src_dir: str, dst_dir: str, shard: int, consequence: str = "") -> None:
    """Put ``src_dir``'s complete shard into ``dst_dir`` under its final name in one step: a hard link (local) or a
    copy, made under a temporary name and renamed, so a kill never leaves half a file under a shard's name."""
    fs, src_folder = storage.filesystem(src_dir)
    dst_folder = storage.filesystem(dst_dir)[1]
    src = posixpath.join(src_folder, shard_name(shard))
    final = posixpath.join(dst_folder, shard_name(shard))
    with storage.writing(storage.join(dst_dir, shard_name(shard)), consequence):
        fs.makedirs(dst_folder, exist_ok=True)
        if not storage.is_local(dst_dir):
            fs.copy(src, final)  # one object written by one request: whole or absent
            return
        tmp = posixpath.join(dst_folder, f".{shard_name(shard)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.link(src, tmp)
        except OSError:
            fs.copy(src, tmp)
        fs.mv(tmp, final)


def read_shard(topk_dir: str, shard: int) -> pa.Table | None:
    uri = storage.join(topk_dir, shard_name(shard))
    if not storage.exists(uri):
        return None
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def write_shard(topk_dir: str, task: ShardTask, user_ids: np.ndarray, histories: list, items: np.ndarray,
                scores: np.ndarray, model_version: str, settings: str,
                consequence: str = "; the shard's previous file is as it was") -> dict:
    """Write one shard atomically: a temporary name in the same folder, then a rename."""
    table = pa.table({"user_id": pa.array(user_ids, pa.int64()),
                      "item_ids": pa.array([row[row >= 0].tolist() for row in items], pa.list_(pa.int64())),
                      "scores": pa.array([s[i >= 0].astype(np.float32).tolist() for i, s in zip(items, scores)],
                                         pa.list_(pa.float32())),
                      "history_hash": pa.array([history_hash(h) for h in histories], pa.string()),
                      "model_version": pa.array([model_version] * len(user_ids), pa.string())},
                     schema=TOPK_SCHEMA.with_metadata({"recllm_fingerprint": task.fingerprint, "recllm_settings": settings}))
    fs, folder = storage.filesystem(topk_dir)
    final = posixpath.join(folder, shard_name(task.shard))
    tmp = posixpath.join(folder, f".{shard_name(task.shard)}.tmp-{uuid.uuid4().hex[:8]}")
    with storage.writing(storage.join(topk_dir, shard_name(task.shard)), consequence):
        fs.makedirs(folder, exist_ok=True)
        try:
            with fs.open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
        except BaseException:
            with contextlib.suppress(OSError):
                fs.rm(tmp)
            raise
        fs.mv(tmp, final)
    return {"shard": task.shard, "users": len(user_ids), "fingerprint": task.fingerprint}


def write_success(topk_dir: str, manifest: dict, consequence: str = "") -> None:
    fs, folder = storage.filesystem(topk_dir)
    tmp = posixpath.join(folder, f".{SUCCESS}.tmp-{uuid.uuid4().hex[:8]}")
    with storage.writing(storage.join(topk_dir, SUCCESS), consequence):
        try:
            with fs.open(tmp, "w") as f:
                f.write(json.dumps(manifest, indent=2))
        except BaseException:
            with contextlib.suppress(OSError):
                fs.rm(tmp)
            raise
        fs.mv(tmp, posixpath.join(folder, SUCCESS))


def remove_stale_temporaries(topk_dir: str) -> None:
    """Temporary files a killed run left behind (hidden names, never read as shards)."""
    fs, folder = storage.filesystem(topk_dir)
    if not fs.exists(folder):
        return
    for path in fs.ls(folder, detail=False):
        if posixpath.basename(path).startswith(".") and ".tmp-" in path:
            fs.rm(path)


def clear_success(topk_dir: str) -> None:
    fs, folder = storage.filesystem(topk_dir)
    path = posixpath.join(folder, SUCCESS)
    if fs.exists(path):
        fs.rm(path)
