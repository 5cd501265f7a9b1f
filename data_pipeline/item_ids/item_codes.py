"""What every identifier scheme produces, and the item_codes.parquet layout the trainers and the code trie read.

item_codes.parquet: item_id (dense), source_id, codes list<int32>, tokens list<string>, and for the subtoken
scheme the item's text. ``codes`` are per-level code indices (semantic, precomputed), the item's index
(atomic) or tokenizer ids (subtoken).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data_pipeline import storage

ITEM_CODES_FILE = "item_codes.parquet"
USER_CODES_FILE = "user_codes.parquet"
TOKENS_FILE = "tokens.json"
CODEBOOK_FILE = "codebook.safetensors"
STATS_FILE = "stats.json"


def semantic_token(level: int, code: int) -> str:
    """LC-Rec naming: level 0 -> <a_12>, level 1 -> <b_7>, ..."""
    return f"<{chr(ord('a') + level)}_{code}>"


def semantic_vocabulary(levels: int, codes: int) -> list[str]:
    """Every token of an L x C codebook, level-major: the tokens added to the LM."""
    return [semantic_token(level, code) for level in range(levels) for code in range(codes)]


@dataclass
class BuiltIds:
    """One scheme's output, written by the stage into item_ids/."""

    items: pa.Table
    """item_codes.parquet rows, in item_id order."""
    new_tokens: list[str]
    """tokens.json: new LM tokens, in the order they are added."""
    stats: dict
    tables: dict[str, pa.Table] = field(default_factory=dict)
    """Further Parquet files by name (atomic: user_codes.parquet)."""
    codebook: tuple[dict, dict] | None = None
    """(tensors, metadata) for codebook.safetensors (semantic only)."""


def item_codes_table(items: pa.Table, codes: list[list[int]] | np.ndarray, tokens: list[list[str]],
                     text: list[str] | None = None) -> pa.Table:
    columns = {
        "item_id": items.column("item_id").cast(pa.int64()),
        "source_id": items.column("source_id").cast(pa.string()),
        "codes": pa.array([list(map(int, row)) for row in codes], pa.list_(pa.int32())),
        "tokens": pa.array(tokens, pa.list_(pa.string())),
    }
    if text is not None:
        columns["text"] = pa.array(text, pa.string())
    return pa.table(columns)


def read_item_codes(item_ids_dir: str) -> pa.Table:
    return storage.read_parquet(storage.join(item_ids_dir, ITEM_CODES_FILE))


def code_matrix(table: pa.Table) -> np.ndarray:
    """The codes column as [N, L] int64; every row must have the same length (semantic, precomputed, atomic)."""
    codes = table.column("codes").combine_chunks()
    lengths = np.diff(codes.offsets.to_numpy())
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("codes have different lengths; use the rows one by one")
    width = int(lengths[0]) if len(lengths) else 0
    return codes.flatten().to_numpy().astype(np.int64).reshape(-1, width)
