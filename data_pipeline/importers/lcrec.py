"""LC-Rec JSON: <name>.inter.json {user: [item, ...]} in time order, optional <name>.item.json catalogue."""

from __future__ import annotations

import json

import pandas as pd

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import ITEM_TEXT_FIELDS, RawDataset, interactions_frame


def _load_json(uri: str):
    text = storage.read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(uri, f"invalid JSON: {exc.msg}", row=f"line {exc.lineno}") from None


def _item_key(value, uri: str, user: str, pos: int) -> str:
    if value is None:
        raise DataError(uri, "null item ID", row=f"user '{user}' position {pos}", field="item")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
        raise DataError(uri, f"item ID {value!r} is not an integer", row=f"user '{user}' position {pos}", field="item")
    return str(int(value))


def read(cfg: DataConfig) -> RawDataset:
    inter_uri = storage.join(cfg.path, f"{cfg.name}.inter.json")
    item_uri = storage.join(cfg.path, f"{cfg.name}.item.json")
    seqs = _load_json(inter_uri)
    if not isinstance(seqs, dict):
        raise DataError(inter_uri, f"expected an object {{user: [items]}}, got {type(seqs).__name__}")
    users, items, positions = [], [], []
    for user, seq in seqs.items():
        if not user.strip().lstrip("-").isdigit():
            raise DataError(inter_uri, f"user ID {user!r} is not an integer", row=f"user '{user}'", field="user")
        if not isinstance(seq, list):
            raise DataError(inter_uri, f"expected a list of item IDs, got {type(seq).__name__}", row=f"user '{user}'")
        for pos, value in enumerate(seq):
            items.append(_item_key(value, inter_uri, user, pos))
            users.append(str(int(user)))
            positions.append(pos)
    catalogue = None
    files = [inter_uri]
    if storage.exists(item_uri):
        files.append(item_uri)
        meta = _load_json(item_uri)
        if not isinstance(meta, dict):
            raise DataError(item_uri, f"expected an object {{item: {{title, ...}}}}, got {type(meta).__name__}")
        rows = []
        for key, info in meta.items():
            if not key.strip().lstrip("-").isdigit():
                raise DataError(item_uri, f"item ID {key!r} is not an integer", row=f"item '{key}'", field="item")
            if not isinstance(info, dict):
                raise DataError(item_uri, f"expected an object of text fields, got {type(info).__name__}", row=f"item '{key}'")
            row = {"item": str(int(key))}
            for name in ITEM_TEXT_FIELDS:
                value = info.get(name)
                if isinstance(value, list):
                    value = ",".join(map(str, value))
                row[name] = None if value in (None, "") else str(value)
            rows.append(row)
        catalogue = pd.DataFrame(rows, columns=["item", *ITEM_TEXT_FIELDS]).astype("string")
        known = set(catalogue["item"])
        for user, item, pos in zip(users, items, positions):
            if item not in known:
                raise DataError(inter_uri, f"item {item} is not in the catalogue {item_uri}",
                                row=f"user '{user}' position {pos}", field="item")
    return RawDataset(interactions_frame(users, items, positions), catalogue, source_files=files)
