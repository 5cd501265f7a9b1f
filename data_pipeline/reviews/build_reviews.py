"""`recllm build-reviews`: each review domain through the data pipeline (importer + canonical, as `prepare`) into
run_dir/domains/<name>/dataset, then a leave-last-out split of its reviews with each review's k-review
user and item histories into run_dir/domains/<name>/reviews/reviews.parquet. LoID and the review tasks read it.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.reviews.config import ReviewsConfig
from data_pipeline.run_layout import DATASET_DIR, MANIFEST_FILE, RunLayout

log = logging.getLogger("recllm.reviews")

SPLITS = ("train", "valid", "test")
REVIEW_SCHEMA = pa.schema([
    ("review_id", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.float64()),
    ("timestamp", pa.int64()), ("text", pa.string()), ("summary", pa.string()), ("split", pa.string()),
    ("user_history", pa.list_(pa.int64())), ("item_history", pa.list_(pa.int64()))])


def domain_dir(run_dir: str, domain: str) -> str:
    return RunLayout(run_dir).domain(domain)


def split_reviews(inter: pd.DataFrame, min_user_reviews: int) -> pd.Series:
    """Per user in time order (``position``): last -> test, second-to-last -> valid, the rest -> train;
    users with fewer than ``min_user_reviews`` reviews stay in train."""
    order = inter.sort_values(["user_id", "position"], kind="stable")
    n = order.groupby("user_id")["item_id"].transform("size").to_numpy()
    from_end = (order.groupby("user_id").cumcount(ascending=False)).to_numpy()
    split = np.where(n < min_user_reviews, "train",
                     np.where(from_end == 0, "test", np.where(from_end == 1, "valid", "train")))
    return pd.Series(split, index=order.index).reindex(inter.index)


def histories(frame: pd.DataFrame, key: str, k: int) -> list[list[int]]:
    """For every review: the ``k`` most recent *train* reviews sharing its ``key`` (user_id or item_id),
    newest first, leaving out the review itself."""
    train = frame[frame["split"] == "train"].sort_values(["timestamp", "review_id"], ascending=False,
                                                         kind="stable")
    by_key = {int(g): ids.to_numpy() for g, ids in train.groupby(key, sort=False)["review_id"]}
    empty = np.zeros(0, dtype=np.int64)
    out = []
    for g, rid in zip(frame[key].to_numpy(), frame["review_id"].to_numpy()):
        ids = by_key.get(int(g), empty)
        out.append([int(i) for i in ids[ids != rid][:k]])
    return out


def build_review_table(inter: pd.DataFrame, cfg: ReviewsConfig, source: str) -> pa.Table:
    """The interactions of one domain -> one row per review with its split and its two histories."""
    missing = [c for c in ("user_id", "item_id", "position", "timestamp", "rating", "review") if c not in inter]
    if missing:
        raise DataError(source, f"missing column(s) {missing}", field=missing[0])
    for name in ("rating", "timestamp"):
        bad = inter[name].isna().to_numpy().nonzero()[0]
        if len(bad):
            raise DataError(source, f"{name} is null; rating prediction needs it on every review",
                            row=int(bad[0]), field=name)
    frame = inter.reset_index(drop=True).copy()
    frame["review_id"] = np.arange(len(frame), dtype=np.int64)
    frame["split"] = split_reviews(frame, cfg.min_user_reviews)
    frame["user_history"] = histories(frame, "user_id", cfg.k)
    frame["item_history"] = histories(frame, "item_id", cfg.k)
    text = frame["review"].astype(object).where(frame["review"].notna(), "").map(
        lambda s: str(s)[:cfg.max_review_chars])
    summary = frame["summary"].astype(object).where(frame["summary"].notna(), None)
    return pa.table({"review_id": frame["review_id"].to_numpy(), "user_id": frame["user_id"].to_numpy("int64"),
                     "item_id": frame["item_id"].to_numpy("int64"), "rating": frame["rating"].to_numpy("float64"),
                     "timestamp": frame["timestamp"].to_numpy("int64"), "text": text.tolist(),
                     "summary": summary.tolist(), "split": frame["split"].tolist(),
                     "user_history": frame["user_history"].tolist(),
                     "item_history": frame["item_history"].tolist()}, schema=REVIEW_SCHEMA)


def run_build_reviews(cfg: ReviewsConfig, run_dir: str) -> dict:
    """Import and split every domain in memory first, then write: a bad file in any domain leaves nothing."""
    from data_pipeline.canonical import build_canonical
    from data_pipeline.importers import import_raw
    from data_pipeline.prepare import write_dataset

    built = {}
    for domain, path in cfg.domains.items():
        t0 = time.perf_counter()
        data_cfg = DataConfig(format="amazon_reviews", path=path, name="", num_shards=1)
        problems = data_cfg.check()
        if problems:
            raise DataError(path, f"reviews.domains.{domain}: {'; '.join(problems)}")
        raw = import_raw(data_cfg)
        data = build_canonical(raw, data_cfg)
        table = build_review_table(data.interactions.to_pandas(), cfg, raw.source_files[0])
        splits = table.column("split").to_pylist()
        counts = {"reviews": table.num_rows, "users": data.counts["users"], "items": data.counts["items"],
                  **{s: splits.count(s) for s in SPLITS}}
        built[domain] = (data_cfg, raw.source_files, data, table, counts, time.perf_counter() - t0)
    for domain, (data_cfg, files, data, table, counts, seconds) in built.items():
        ddir = domain_dir(run_dir, domain)
        write_dataset(data, storage.join(ddir, DATASET_DIR), data_cfg, files)
        with storage.staged_folder(storage.join(ddir, "reviews")) as staged:
            staged.write_parquet("reviews.parquet", table)
            manifest = {"domain": domain, "source": data_cfg.path, "files": files, "k": cfg.k,
                        "min_user_reviews": cfg.min_user_reviews, "counts": counts, "seconds": round(seconds, 2)}
            staged.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        log.info("reviews %s: %s", domain, counts)
    return {domain: b[4] for domain, b in built.items()}


def read_reviews(run_dir: str, domain: str, columns: list[str] | None = None) -> pa.Table:
    uri = storage.join(domain_dir(run_dir, domain), "reviews", "reviews.parquet")
    if not storage.exists(uri):
        raise DataError(uri, "not found; run `recllm build-reviews` first")
    return storage.read_parquet(uri, columns)
