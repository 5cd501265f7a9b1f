"""Users' own logs in canonical Parquet: <path>/interactions[.parquet|/] with user_id, item_id and optional
timestamp, position, rating, review, summary; optional <path>/items.parquet with item_id + text fields."""

from __future__ import annotations

import pandas as pd

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import ITEM_TEXT_FIELDS, RawDataset, interactions_frame


def _locate(cfg: DataConfig, stem: str) -> str | None:
    for cand in (storage.join(cfg.path, f"{stem}.parquet"), storage.join(cfg.path, stem)):
        if storage.exists(cand):
            return cand
    return None


def _ids(frame: pd.DataFrame, column: str, uri: str) -> list[str]:
    col = frame[column]
    bad = col.isna()
    if bad.any():
        raise DataError(uri, "null ID", row=int(bad.to_numpy().nonzero()[0][0]), field=column)
    if pd.api.types.is_float_dtype(col):
        frac = col != col.round()
        if frac.any():
            raise DataError(uri, f"ID {col[frac].iloc[0]!r} is not an integer", row=int(frac.to_numpy().nonzero()[0][0]), field=column)
        col = col.astype("int64")
    return col.astype(str).tolist()


def read(cfg: DataConfig) -> RawDataset:
    uri = _locate(cfg, "interactions")
    if uri is None:
        raise DataError(storage.join(cfg.path, "interactions.parquet"), "file not found (format parquet expects "
                        "interactions.parquet or interactions/*.parquet)")
    frame = storage.read_parquet(uri).to_pandas()
    for column in ("user_id", "item_id"):
        if column not in frame.columns:
            raise DataError(uri, "missing column", field=column)
    users, items = _ids(frame, "user_id", uri), _ids(frame, "item_id", uri)
    stamps = frame["timestamp"].astype("Int64") if "timestamp" in frame.columns else None
    ratings = frame["rating"].astype("float64") if "rating" in frame.columns else None
    if ratings is not None:
        bad = ratings.notna() & ((ratings < cfg.rating_min) | (ratings > cfg.rating_max))
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(uri, f"rating {ratings.iloc[row]} outside [{cfg.rating_min}, {cfg.rating_max}]", row=row, field="rating")
    raw = interactions_frame(users, items, [0] * len(users), stamps.tolist() if stamps is not None else None,
                             ratings.tolist() if ratings is not None else None,
                             frame["review"].tolist() if "review" in frame.columns else None,
                             frame["summary"].tolist() if "summary" in frame.columns else None)
    order = ["user", "timestamp", "_row"] if stamps is not None else ["user", "_row"]
    raw["_row"] = frame["position"].to_numpy() if "position" in frame.columns else range(len(raw))
    raw = raw.sort_values(order, kind="stable")
    raw["position"] = raw.groupby("user").cumcount().astype("int64")
    raw = raw.drop(columns="_row").sort_index()
    catalogue = None
    item_uri = _locate(cfg, "items")
    files = [uri]
    if item_uri:
        files.append(item_uri)
        meta = storage.read_parquet(item_uri).to_pandas()
        if "item_id" not in meta.columns:
            raise DataError(item_uri, "missing column", field="item_id")
        catalogue = pd.DataFrame({"item": _ids(meta, "item_id", item_uri)}, dtype="string")
        for name in ITEM_TEXT_FIELDS:
            catalogue[name] = meta[name].astype("string") if name in meta.columns else pd.Series([None] * len(meta), dtype="string")
        known = set(catalogue["item"])
        unknown = ~raw["item"].isin(known)
        if unknown.any():
            row = int(unknown.to_numpy().nonzero()[0][0])
            raise DataError(uri, f"item {raw['item'].iloc[row]} is not in the catalogue {item_uri}", row=row, field="item_id")
    return RawDataset(raw, catalogue, source_files=files)
