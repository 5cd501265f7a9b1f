"""How the sample stage writes items and users in prompt text, from item_ids/ (the scheme's output).

An item is ``"".join(tokens)`` of its item_codes.parquet row (semantic, precomputed, atomic: <a_12><b_7>...,
<item_123>) or its ``text`` (subtoken: item_123, split later by the LM tokenizer). A user is 'user <user_N>'
where the atomic scheme wrote user_codes.parquet and user tokens are on, else 'the user'.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.run_layout import USER_CODES_FILE, read_item_codes

ANONYMOUS_USER = "the user"


def item_names(item_codes: pa.Table, num_items: int, where: str) -> list[str]:
    """Text of every item, indexed by dense item_id; every item of the dataset must have a row."""
    ids = item_codes.column("item_id").to_numpy()
    in_range = not len(ids) or (ids.min() >= 0 and ids.max() < num_items)
    if len(ids) != num_items or len(np.unique(ids)) != num_items or not in_range:
        raise DataError(where, f"{len(ids)} rows for item_ids 0..{num_items - 1} of the dataset; "
                               "rebuild item_ids/ from this dataset")
    if "text" in item_codes.column_names and item_codes.column("text").null_count == 0:
        names = item_codes.column("text").to_pylist()
    else:
        names = ["".join(tokens) for tokens in item_codes.column("tokens").to_pylist()]
    out = [""] * num_items
    for i, name in zip(ids.tolist(), names):
        if not name:
            raise DataError(where, "item has no tokens and no text", row=f"item_id {i}")
        out[i] = name
    return out


def user_names(user_codes: pa.Table | None, num_users: int) -> list[str]:
    """'user <user_N>' per dense user_id from user_codes.parquet, or 'the user' for everyone when it is None."""
    if user_codes is None:
        return [ANONYMOUS_USER] * num_users
    out = [ANONYMOUS_USER] * num_users
    for u, token in zip(user_codes.column("user_id").to_pylist(), user_codes.column("token").to_pylist()):
        if 0 <= u < num_users and token:
            out[u] = f"user {token}"
    return out


def read_item_ids(item_ids_dir: str, with_users: bool) -> tuple[pa.Table, pa.Table | None]:
    """(item_codes, user_codes or None) of an item_ids/ folder."""
    item_codes = read_item_codes(item_ids_dir)
    users_uri = storage.join(item_ids_dir, USER_CODES_FILE)
    user_codes = storage.read_parquet(users_uri) if with_users and storage.exists(users_uri) else None
    return item_codes, user_codes


def clean_text(column: pa.ChunkedArray) -> list[str | None]:
    """Stripped strings, with empty ones as None."""
    stripped = pc.utf8_trim_whitespace(column)
    return [s if s else None for s in stripped.to_pylist()]
