"""Users' own logs in canonical Parquet: <path>/interactions[.parquet|/] with user_id, item_id and optional
timestamp, position, rating, review, summary; optional <path>/items.parquet with item_id + text fields. IDs may be
int, string, large_string or dictionary columns; timestamps Arrow TIMESTAMPs (any unit, any time zone), dates or
integer epoch seconds."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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
    if isinstance(col.dtype, pd.CategoricalDtype):  # an Arrow dictionary column
        col = col.astype(object)
    bad = col.isna()
    if bad.any():
        raise DataError(uri, "null ID", row=int(bad.to_numpy().nonzero()[0][0]), field=column)
    if pd.api.types.is_float_dtype(col):
        frac = col != col.round()
        if frac.any():
            raise DataError(uri, f"ID {col[frac].iloc[0]!r} is not an integer", row=int(frac.to_numpy().nonzero()[0][0]), field=column)
        col = col.astype("int64")
    return col.astype(str).tolist()


_UNIT_SECONDS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _timestamps(column: pa.ChunkedArray, uri: str) -> pd.Series:
    """Epoch seconds (Int64) from an Arrow timestamp column (any unit, with or without a time zone: the stored
    values are UTC), a date column, or integer epoch seconds. A null, a negative time or any other type is one
    error naming the row and the field."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        values = pc.divide(pc.cast(column, pa.int64()), _UNIT_SECONDS[kind.unit])
    elif pa.types.is_date(kind):
        values = pc.multiply(pc.cast(pc.cast(column, pa.date32()), pa.int64()), 86_400)
    elif pa.types.is_integer(kind):
        values = pc.cast(column, pa.int64())
    elif pa.types.is_floating(kind) and pc.all(pc.equal(column, pc.round(column))).as_py() is not False:
        values = pc.cast(column, pa.int64())
    else:
        first = next((v for v in column.to_pylist() if v is not None), None)
        raise DataError(uri, f"timestamp {first!r} of type {kind}; expected an Arrow timestamp or integer epoch "
                             "seconds", row=0, field="timestamp")
    stamps = pd.Series(values.to_numpy(zero_copy_only=False), dtype="Int64")
    if stamps.isna().any():
        raise DataError(uri, "null timestamp", row=int(stamps.isna().to_numpy().nonzero()[0][0]), field="timestamp")
    negative = (stamps < 0).to_numpy(dtype=bool)
    if negative.any():
        row = int(negative.nonzero()[0][0])
        raise DataError(uri, f"negative timestamp {stamps.iloc[row]} (before 1970)", row=row, field="timestamp")
    return stamps


def read(cfg: DataConfig) -> RawDataset:
    uri = _locate(cfg, "interactions")
    if uri is None:
        raise DataError(storage.join(cfg.path, "interactions.parquet"), "file not found (format parquet expects "
                        "interactions.parquet or interactions/*.parquet)")
    table = storage.read_parquet(uri)
    stamps = _timestamps(table.column("timestamp"), uri) if "timestamp" in table.column_names else None
    frame = table.drop_columns(["timestamp"] if stamps is not None else []).to_pandas()
    for column in ("user_id", "item_id"):
        if column not in frame.columns:
            raise DataError(uri, "missing column", field=column)
    users, items = _ids(frame, "user_id", uri), _ids(frame, "item_id", uri)
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
