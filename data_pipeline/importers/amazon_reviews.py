"""Amazon review dumps (2014/2018 5-core): CSV with or without header, or JSON lines.

Fields used: reviewerID, asin, overall (rating), reviewText, summary, unixReviewTime.
A header-less CSV is read in the Kaggle column order of the 2014 dumps.
"""

from __future__ import annotations

import csv
import io
import json
import math

import pandas as pd

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import RawDataset, interactions_frame

KAGGLE_ORDER = ["reviewerID", "asin", "reviewerName", "helpful", "reviewText", "overall", "summary",
                "unixReviewTime", "reviewTime"]
REQUIRED = ["reviewerID", "asin", "overall", "unixReviewTime"]


def _files(cfg: DataConfig) -> list[str]:
    found = [f for ext in (".csv", ".json", ".jsonl") for f in storage.list_files(cfg.path, ext)]
    if cfg.name:
        named = [f for f in found if f.rsplit("/", 1)[-1].startswith(cfg.name)]
        found = named or found
    if not found:
        raise DataError(cfg.path, "no review files (*.csv, *.json, *.jsonl) found")
    return sorted(found)


def _csv_records(uri: str, text: str):
    reader = csv.reader(io.StringIO(text))
    try:
        first = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(uri, f"malformed CSV: {exc}", row=1) from None
    if "reviewerID" in first:
        header, start = first, 2
    else:
        header, start = KAGGLE_ORDER, 1
        if len(first) != len(KAGGLE_ORDER):
            raise DataError(uri, f"no header and {len(first)} columns; expected a header or the "
                                 f"{len(KAGGLE_ORDER)} columns {KAGGLE_ORDER}", row=1)
        yield 1, dict(zip(header, first))
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(uri, f"missing column(s) {missing}", field=missing[0])
    try:
        for rowno, values in enumerate(reader, start=start):
            if len(values) != len(header):
                raise DataError(uri, f"{len(values)} values for {len(header)} columns", row=rowno)
            yield rowno, dict(zip(header, values))
    except csv.Error as exc:
        raise DataError(uri, f"malformed CSV: {exc}", row=reader.line_num) from None


def _json_records(uri: str, text: str):
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(uri, f"invalid JSON: {exc.msg}", row=f"line {lineno}") from None
        if not isinstance(rec, dict):
            raise DataError(uri, "expected one JSON object per line", row=f"line {lineno}")
        yield lineno, rec


def read(cfg: DataConfig) -> RawDataset:
    users, items, stamps, ratings, reviews, summaries = [], [], [], [], [], []
    files = _files(cfg)
    for uri in files:
        text = storage.read_text(uri)
        records = _csv_records(uri, text) if uri.endswith(".csv") else _json_records(uri, text)
        for rowno, rec in records:
            for f in REQUIRED:
                if f not in rec:
                    raise DataError(uri, "missing field", row=rowno, field=f)
            for f in ("reviewerID", "asin"):
                if rec[f] is None or str(rec[f]).strip() == "":
                    raise DataError(uri, "null or empty ID", row=rowno, field=f)
            try:
                rating = float(rec["overall"])
                if math.isnan(rating):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(uri, f"rating {rec['overall']!r} is not a number", row=rowno, field="overall") from None
            if not cfg.rating_min <= rating <= cfg.rating_max:
                raise DataError(uri, f"rating {rating} outside [{cfg.rating_min}, {cfg.rating_max}]",
                                row=rowno, field="overall")
            try:
                stamp = int(rec["unixReviewTime"])
            except (TypeError, ValueError):
                raise DataError(uri, f"timestamp {rec['unixReviewTime']!r} is not an integer", row=rowno,
                                field="unixReviewTime") from None
            users.append(str(rec["reviewerID"]).strip())
            items.append(str(rec["asin"]).strip())
            stamps.append(stamp)
            ratings.append(rating)
            reviews.append(rec.get("reviewText") or None)
            summaries.append(rec.get("summary") or None)
    if not users:
        raise DataError(files[0], "no reviews")
    frame = interactions_frame(users, items, [0] * len(users), stamps, ratings, reviews, summaries)
    # Order within a user by time; ties keep file order (a stable sort).
    frame["_row"] = range(len(frame))
    frame = frame.sort_values(["user", "timestamp", "_row"], kind="stable")
    frame["position"] = frame.groupby("user").cumcount().astype("int64")
    frame = frame.drop(columns="_row").sort_index()
    return RawDataset(frame, None, source_files=files)
