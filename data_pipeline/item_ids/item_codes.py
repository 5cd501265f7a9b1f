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
from data_pipeline.errors import DataError
from data_pipeline.run_layout import (ITEM_CODES_FILE, STATS_FILE, TOKENS_FILE, USER_CODES_FILE, read_item_codes,
                                      read_new_tokens)


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
    text_vectors: np.ndarray | None = None
    """[num_items, dims] for text_vectors.safetensors (``text.vectors`` on and the data has text)."""


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


def item_ids_files(stats: dict) -> dict[str, str]:
    """rel -> sha256 of the files later stages read, from a stats.json: the samples manifest records them, and
    train refuses samples whose item_ids/ was rebuilt since."""
    return {rel: entry["sha256"] for rel, entry in stats.get("files", {}).items()
            if rel in (ITEM_CODES_FILE, TOKENS_FILE, USER_CODES_FILE)}


def read_item_ids_checked(item_ids_dir: str) -> tuple[pa.Table | None, list[str]]:
    """(item_codes, new tokens) of an item_ids/ folder, read as train and infer start: both files readable,
    every file stats.json lists there byte for byte (a file from another build-ids run is refused), and every
    token an item's row names in tokens.json (subtoken rows name the LM's own pieces). item_codes is None only
    where the folder neither has nor lists one (build-review-samples writes tokens alone)."""
    tokens = read_new_tokens(item_ids_dir)
    stats_uri = storage.join(item_ids_dir, STATS_FILE)
    listed = (storage.read_json(stats_uri).get("files") or {}) if storage.exists(stats_uri) else {}
    has_codes = ITEM_CODES_FILE in listed or storage.exists(storage.join(item_ids_dir, ITEM_CODES_FILE))
    codes = read_item_codes(item_ids_dir) if has_codes else None
    if listed:
        storage.verify_files(item_ids_dir, listed, stats_uri, "rerun `recllm build-ids`")
    if codes is None or ("text" in codes.column_names and codes.column("text").null_count == 0):
        return codes, tokens
    vocab = set(tokens)
    for item, names in zip(codes.column("item_id").to_pylist(), codes.column("tokens").to_pylist()):
        if not names or any(t not in vocab for t in names):
            raise DataError(storage.join(item_ids_dir, TOKENS_FILE),
                            f"item_id {item}'s tokens {names} in {ITEM_CODES_FILE} are not all in it: the two files "
                            "come from different build-ids runs; rerun `recllm build-ids`")
    return codes, tokens


def code_matrix(table: pa.Table) -> np.ndarray:
    """The codes column as [N, L] int64; every row must have the same length (semantic, precomputed, atomic)."""
    codes = table.column("codes").combine_chunks()
    lengths = np.diff(codes.offsets.to_numpy())
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("codes have different lengths; use the rows one by one")
    width = int(lengths[0]) if len(lengths) else 0
    return codes.flatten().to_numpy().astype(np.int64).reshape(-1, width)
