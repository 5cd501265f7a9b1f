"""The precomputed scheme: import an LC-Rec/LETTER <name>.index.json {source item id: ["<a_12>", "<b_7>", ...]}.

Items are matched through items.parquet source_id. Released indexes can contain collisions (Instruments'
LETTER index has 48 colliding items); they are resolved like the semantic scheme's, with code-index
closeness standing in for embedding distance, and counted before and after.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.item_ids.collisions import collision_counts, resolve_collisions
from data_pipeline.item_ids.item_codes import BuiltIds, item_codes_table, semantic_token
from data_pipeline.run_layout import MANIFEST_FILE

TOKEN_PATTERN = re.compile(r"<([a-z])_(\d+)>")


def index_path_from_manifest(manifest: dict, dataset_dir: str) -> str:
    source = manifest.get("source", {})
    if not source.get("path") or not source.get("name"):
        raise DataError(storage.join(dataset_dir, MANIFEST_FILE),
                        "source path/name missing; set ids.index_path to the <name>.index.json to import")
    return storage.join(source["path"], f"{source['name']}.index.json")


def _parse_token(token, uri: str, source_id: str, level: int) -> int:
    match = TOKEN_PATTERN.fullmatch(token) if isinstance(token, str) else None
    if match is None or ord(match.group(1)) - ord("a") != level:
        expected = semantic_token(level, 0).replace("0", "N")
        raise DataError(uri, f"token {token!r} is not of the form {expected}", row=f"item '{source_id}'")
    return int(match.group(2))


class IndexDistancePreference:
    """With no vectors, codes nearer the item's own code index come first (its own code before all)."""

    def __init__(self, codes: np.ndarray, num_codes: int):
        self.codes, self.num_codes = codes, num_codes

    def nearest_last_codes(self, rows: np.ndarray, k: int) -> np.ndarray:
        distance = np.abs(np.arange(self.num_codes)[None, :] - self.codes[rows, -1:])
        return np.argsort(distance, axis=1, kind="stable")[:, :k]

    def ranked_codes(self, row: int, prefix: np.ndarray) -> np.ndarray:
        return np.argsort(np.abs(np.arange(self.num_codes) - self.codes[row, len(prefix)]), kind="stable")


def build_precomputed_ids(items: pa.Table, index_uri: str) -> BuiltIds:
    if not storage.exists(index_uri):
        raise DataError(index_uri, "index file not found; set ids.index_path to the <name>.index.json to import")
    try:
        index = json.loads(storage.read_text(index_uri))
    except json.JSONDecodeError as exc:
        raise DataError(index_uri, f"invalid JSON: {exc.msg}", row=f"line {exc.lineno}") from None
    if not isinstance(index, dict):
        raise DataError(index_uri, f"expected an object {{item: [tokens]}}, got {type(index).__name__}")
    source_ids = items.column("source_id").to_pylist()
    item_ids = items.column("item_id").to_pylist()
    rows = []
    for item_id, source_id in zip(item_ids, source_ids):
        tokens = index.get(source_id)
        if tokens is None:
            raise DataError(index_uri, f"item {item_id} (source id {source_id!r}) has no code in the index",
                            row=f"item '{source_id}'")
        if not isinstance(tokens, list) or not tokens:
            raise DataError(index_uri, f"expected a non-empty list of tokens, got {tokens!r}", row=f"item '{source_id}'")
        rows.append([_parse_token(t, index_uri, source_id, level) for level, t in enumerate(tokens)])
    levels = {len(r) for r in rows}
    if len(levels) > 1:
        raise DataError(index_uri, f"items have different numbers of levels {sorted(levels)}")
    codes = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    num_codes = int(codes.max()) + 1 if codes.size else 1
    before = collision_counts(codes, num_codes)

    resolved, report = resolve_collisions(codes, num_codes, IndexDistancePreference(codes, num_codes),
                                          priority=np.arange(len(codes)))
    tokens = [[semantic_token(level, int(c)) for level, c in enumerate(row)] for row in resolved]
    vocabulary = [semantic_token(level, code) for level in range(codes.shape[1]) for code in range(num_codes)]
    stats = {"index_path": index_uri, "levels": int(codes.shape[1]), "codes": num_codes,
             "collisions": {"before": before, "after": collision_counts(resolved, num_codes),
                            "resolution": "the lower item_id keeps a shared sequence; the others take the free "
                                          "code nearest in index under their own prefix", **report}}
    return BuiltIds(item_codes_table(items, resolved, tokens), vocabulary, stats)
