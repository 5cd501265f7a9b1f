"""The atomic scheme (CLLM4Rec): one new LM token per item, <item_123>, and per user, <user_45> (dense IDs).

Nothing is learned here; the LM learns the new embeddings during fine-tuning. Without user tokens (a
vocabulary that does not grow with the user base, as bulk serving wants) only items get tokens.
"""

from __future__ import annotations

import pyarrow as pa

from data_pipeline.item_ids.item_codes import BuiltIds, item_codes_table
from data_pipeline.run_layout import USER_CODES_FILE


def item_token(item_id: int) -> str:
    return f"<item_{item_id}>"


def user_token(user_id: int) -> str:
    return f"<user_{user_id}>"


CONTENT_PREFIX = "<text_"
"""A content twin is its collaborative token with this prefix: <item_12> -> <text_item_12> (CLLM4Rec)."""


def content_twin(token: str) -> str:
    return CONTENT_PREFIX + token[1:]


def content_twins(tokens: list[str]) -> list[str]:
    return [content_twin(t) for t in tokens]


def build_atomic_ids(items: pa.Table, users: pa.Table | None, content_tokens: bool = False) -> BuiltIds:
    """Item tokens, plus user tokens and user_codes.parquet when ``users`` is given, plus (``content_tokens``)
    a content twin of each, appended after them so the collaborative tokens keep their ids."""
    item_ids = items.column("item_id").to_pylist()
    item_tokens = [item_token(i) for i in item_ids]
    table = item_codes_table(items, [[i] for i in item_ids], [[t] for t in item_tokens])
    if users is None:
        twins = content_twins(item_tokens) if content_tokens else []
        return BuiltIds(table, item_tokens + twins, {"item_tokens": len(item_tokens), "user_tokens": 0,
                                                     "content_tokens": len(twins)})
    user_tokens = [user_token(u) for u in users.column("user_id").to_pylist()]
    user_table = pa.table({"user_id": users.column("user_id").cast(pa.int64()),
                           "source_id": users.column("source_id").cast(pa.string()),
                           "token": pa.array(user_tokens, pa.string())})
    twins = content_twins(item_tokens + user_tokens) if content_tokens else []
    stats = {"item_tokens": len(item_tokens), "user_tokens": len(user_tokens), "content_tokens": len(twins)}
    return BuiltIds(table, item_tokens + user_tokens + twins, stats, tables={USER_CODES_FILE: user_table})
