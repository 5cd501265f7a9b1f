"""MiniOneRec CSV splits: <path>/{train,valid,test}/*.csv with user_id, history_item_id, item_id
(and titles); list columns are Python list literals, parsed with ast.literal_eval (no eval).

The rows are the split. Interactions are rebuilt from each user's longest history + target
(MiniOneRec truncates histories, so older interactions may be absent).
"""

from __future__ import annotations

import ast
import csv
import io

import pandas as pd

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import RawDataset, interactions_frame

REQUIRED = ["user_id", "history_item_id", "item_id"]


def _list(value: str, uri: str, rowno: int, field: str) -> list:
    try:
        out = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise DataError(uri, f"not a list literal: {value[:60]!r}", row=rowno, field=field) from None
    if not isinstance(out, (list, tuple)):
        raise DataError(uri, f"not a list: {value[:60]!r}", row=rowno, field=field)
    return list(out)


def _id(value, uri: str, rowno: int, field: str) -> str:
    text = "" if value is None else str(value).strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        raise DataError(uri, "null or empty ID", row=rowno, field=field)
    return text


def read(cfg: DataConfig) -> RawDataset:
    splits: dict[str, pd.DataFrame] = {}
    titles: dict[str, str] = {}
    files: list[str] = []
    for split in ("train", "valid", "test"):
        split_files = [f for f in storage.list_files(storage.join(cfg.path, split), ".csv")
                       if not cfg.name or f.rsplit("/", 1)[-1].startswith(cfg.name)]
        if not split_files:
            raise DataError(storage.join(cfg.path, split), f"no {cfg.name}*.csv for split '{split}'")
        rows = []
        for uri in split_files:
            files.append(uri)
            reader = csv.DictReader(io.StringIO(storage.read_text(uri)))
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(uri, f"missing column(s) {missing}", field=missing[0])
            for rowno, rec in enumerate(reader, start=2):
                hist = [_id(v, uri, rowno, "history_item_id") for v in _list(rec["history_item_id"], uri, rowno, "history_item_id")]
                target = _id(rec["item_id"], uri, rowno, "item_id")
                rows.append((_id(rec["user_id"], uri, rowno, "user_id"), hist, target))
                if rec.get("item_title"):
                    titles.setdefault(target, rec["item_title"])
                if rec.get("history_item_title"):
                    hist_titles = _list(rec["history_item_title"], uri, rowno, "history_item_title")
                    for item, title in zip(hist, hist_titles):
                        titles.setdefault(item, str(title))
        splits[split] = pd.DataFrame(rows, columns=["user", "history", "target"])
    longest: dict[str, list[str]] = {}
    for frame in splits.values():
        for user, hist, target in frame.itertuples(index=False):
            seq = [*hist, target]
            if len(seq) > len(longest.get(user, [])):
                longest[user] = seq
    users, items, positions = [], [], []
    for user, seq in longest.items():
        for pos, item in enumerate(seq):
            users.append(user)
            items.append(item)
            positions.append(pos)
    known = {i for seq in longest.values() for i in seq}
    catalogue = pd.DataFrame({"item": sorted(known)}, dtype="string")
    catalogue["title"] = pd.Series([titles.get(i) for i in catalogue["item"]], dtype="string")
    for name in ("description", "brand", "categories"):
        catalogue[name] = pd.Series([None] * len(catalogue), dtype="string")
    return RawDataset(interactions_frame(users, items, positions), catalogue, given_splits=splits, source_files=files)
