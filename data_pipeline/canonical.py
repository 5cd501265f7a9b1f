"""RawDataset -> canonical tables: filtering, dense user/item IDs, and the train/valid/test sequence rows.

Dense IDs follow a numeric-aware sort of the source IDs, so LC-Rec's 0..N-1 indices stay unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import ITEM_TEXT_FIELDS, RawDataset

log = logging.getLogger("recllm.data")

SEQUENCE_SCHEMA = pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64())), ("target", pa.int64())])


@dataclass
class CanonicalDataset:
    items: pa.Table
    users: pa.Table
    interactions: pa.Table
    sequences: dict[str, pa.Table]
    counts: dict[str, int] = field(default_factory=dict)


def _source_order(ids: pd.Series) -> list[str]:
    unique = pd.unique(ids.astype(str))
    if all(s.lstrip("-").isdigit() for s in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _filter(inter: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, int, int]:
    n_users0, n_items0 = inter["user"].nunique(), inter["item"].nunique()
    if cfg.min_item_interactions > 1:
        counts = inter["item"].value_counts()
        inter = inter[inter["item"].isin(counts[counts >= cfg.min_item_interactions].index)]
    counts = inter["user"].value_counts()
    inter = inter[inter["user"].isin(counts[counts >= cfg.min_user_interactions].index)]
    dropped_users = n_users0 - inter["user"].nunique()
    dropped_items = n_items0 - inter["item"].nunique()
    if dropped_users:
        log.info("dropped %d users with fewer than %d interactions", dropped_users, cfg.min_user_interactions)
    if dropped_items and cfg.min_item_interactions > 1:
        log.info("dropped %d items with fewer than %d interactions", dropped_items, cfg.min_item_interactions)
    return inter, dropped_users, dropped_items


def _rows_to_table(users: list[int], histories: list[list[int]], targets: list[int]) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int64()),
                     "history": pa.array(histories, pa.list_(pa.int64())),
                     "target": pa.array(targets, pa.int64())}, schema=SEQUENCE_SCHEMA)


def leave_last_out(seqs: dict[int, np.ndarray], max_history: int,
                   cold: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Per user: last item -> test, second-to-last -> valid, every earlier prefix -> train.

    Users with fewer than 3 items keep them all for training (SASRec's convention) and get no valid/test row.
    ``cold`` (bool per item_id) marks held-out new items: they are dropped from the train sequence and from every
    history, so they appear only as valid/test targets; a valid/test row left with no history is dropped.
    """
    out = {s: ([], [], []) for s in ("train", "valid", "test")}
    for user, seq in seqs.items():
        seq = seq.tolist()
        n = len(seq)
        train = seq[:n - 2] if n >= 3 else seq
        if cold is not None:
            train = [item for item in train if not cold[item]]
        for t in range(1, len(train)):
            out["train"][0].append(user)
            out["train"][1].append(train[max(0, t - max_history):t])
            out["train"][2].append(train[t])
        if n >= 3:
            valid_target, test_target = seq[n - 2], seq[n - 1]
            before_test = train if cold is not None and cold[valid_target] else train + [valid_target]
            for split, history, target in (("valid", train, valid_target), ("test", before_test, test_target)):
                if history:
                    out[split][0].append(user)
                    out[split][1].append(history[-max_history:])
                    out[split][2].append(target)
    return {s: _rows_to_table(*cols) for s, cols in out.items()}


def draw_cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """Bool per item_id: a seeded ``fraction`` of the catalogue (rounded, at least one item when fraction > 0)."""
    cold = np.zeros(num_items, dtype=bool)
    if fraction > 0 and num_items:
        count = min(num_items, max(1, round(fraction * num_items)))
        cold[np.random.default_rng(seed).choice(num_items, count, replace=False)] = True
    return cold


def global_time(inter: pd.DataFrame, cfg: DataConfig) -> dict[str, pa.Table]:
    """Cut at time quantiles: train on everything before t_valid; each user's first item in
    [t_valid, t_test) is their valid target and first item at or after t_test their test target."""
    t_valid, t_test = np.quantile(inter["timestamp"].to_numpy(dtype="int64"),
                                  [cfg.valid_time_quantile, cfg.test_time_quantile])
    out = {s: ([], [], []) for s in ("train", "valid", "test")}
    H = cfg.max_history
    for user, group in inter.groupby("user_id", sort=True):
        items = group["item_id"].to_numpy().tolist()
        stamps = group["timestamp"].to_numpy(dtype="int64")
        n_train = int((stamps < t_valid).sum())
        for t in range(1, n_train):
            out["train"][0].append(user)
            out["train"][1].append(items[max(0, t - H):t])
            out["train"][2].append(items[t])
        for split, lo, hi in (("valid", t_valid, t_test), ("test", t_test, np.inf)):
            idx = np.nonzero((stamps >= lo) & (stamps < hi))[0]
            if len(idx) and idx[0] > 0:
                t = int(idx[0])
                out[split][0].append(user)
                out[split][1].append(items[max(0, t - H):t])
                out[split][2].append(items[t])
    return {s: _rows_to_table(*cols) for s, cols in out.items()}


def build_canonical(raw: RawDataset, cfg: DataConfig) -> CanonicalDataset:
    inter = raw.interactions
    source = raw.source_files[0] if raw.source_files else cfg.path
    if len(inter) == 0:
        raise DataError(source, "empty dataset: no interactions")
    inter, dropped_users, dropped_items = _filter(inter, cfg)
    if len(inter) == 0:
        raise DataError(source, f"empty dataset: no user has at least {cfg.min_user_interactions} interactions "
                                f"(data.min_user_interactions)")
    # Dense IDs.
    catalogue = raw.items
    if catalogue is not None and cfg.min_item_interactions > 1:
        catalogue = catalogue[catalogue["item"].isin(set(inter["item"]))]
    item_order = _source_order(catalogue["item"] if catalogue is not None else inter["item"])
    item_index = {s: i for i, s in enumerate(item_order)}
    user_order = _source_order(inter["user"])
    user_index = {s: i for i, s in enumerate(user_order)}
    inter = inter.assign(user_id=inter["user"].map(user_index).astype("int64"),
                         item_id=inter["item"].map(item_index).astype("int64"))
    inter = inter.sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)
    inter["position"] = inter.groupby("user_id").cumcount().astype("int64")

    items = pd.DataFrame({"item_id": np.arange(len(item_order), dtype="int64"), "source_id": item_order})
    if catalogue is not None:
        text = catalogue.set_index("item").reindex(item_order)
        for name in ITEM_TEXT_FIELDS:
            items[name] = text[name].to_numpy() if name in text else None
    else:
        for name in ITEM_TEXT_FIELDS:
            items[name] = None
    cold = draw_cold_items(len(item_order), cfg.cold_items, cfg.cold_items_seed)
    item_table = pa.table({"item_id": pa.array(items["item_id"], pa.int64()),
                           "source_id": pa.array(items["source_id"].astype(str), pa.string()),
                           **{n: pa.array(items[n].astype(object).where(items[n].notna(), None), pa.string())
                              for n in ITEM_TEXT_FIELDS},
                           "cold": pa.array(cold, pa.bool_())})
    n_per_user = inter.groupby("user_id").size()
    user_table = pa.table({"user_id": pa.array(np.arange(len(user_order)), pa.int64()),
                           "source_id": pa.array(user_order, pa.string()),
                           "num_interactions": pa.array(n_per_user.reindex(range(len(user_order))).to_numpy(), pa.int64())})

    def col(name, typ):
        series = inter[name]
        return pa.array(series.astype(object).where(series.notna(), None).tolist(), typ)

    inter_table = pa.table({"user_id": pa.array(inter["user_id"], pa.int64()),
                            "item_id": pa.array(inter["item_id"], pa.int64()),
                            "position": pa.array(inter["position"], pa.int64()),
                            "timestamp": col("timestamp", pa.int64()),
                            "rating": col("rating", pa.float64()),
                            "review": col("review", pa.string()),
                            "summary": col("summary", pa.string())})

    if raw.given_splits is not None:
        sequences = {}
        for split, frame in raw.given_splits.items():
            frame = frame[frame["user"].isin(user_index)]
            sequences[split] = _rows_to_table(
                [user_index[u] for u in frame["user"]],
                [[item_index[i] for i in h][-cfg.max_history:] for h in frame["history"]],
                [item_index[t] for t in frame["target"]])
    elif cfg.split == "global_time":
        if inter["timestamp"].isna().any():
            raise DataError(source, f"split global_time needs timestamps; format {cfg.format} has only the order "
                                    f"of interactions (use split=leave_last_out)", field="timestamp")
        sequences = global_time(inter, cfg)
    else:
        grouped = inter.groupby("user_id", sort=True)["item_id"]
        seqs = {int(u): g.to_numpy() for u, g in grouped}
        sequences = leave_last_out(seqs, cfg.max_history, cold if cfg.cold_items else None)
    counts = {"users": user_table.num_rows, "items": item_table.num_rows, "interactions": inter_table.num_rows,
              "dropped_users": int(dropped_users), "dropped_items": int(dropped_items), "cold_items": int(cold.sum()),
              **{f"{s}_rows": t.num_rows for s, t in sequences.items()}}
    log.info("canonical dataset: %s", counts)
    return CanonicalDataset(item_table, user_table, inter_table, sequences, counts)
