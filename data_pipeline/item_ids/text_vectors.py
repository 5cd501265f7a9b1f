"""Item text vectors for `recllm build-ids` (section ``text:``): each item's text, read by a pretrained LM that the
caller passes in (``trainers.lm_text_vectors``), becomes one whitened, unit-length vector, written to
item_ids/text_vectors.safetensors for the scorer. The reader's raw vectors are cached under run_dir/cache/, keyed by
the texts, the reader's weights, layer and token budget, so a later build-ids on the same catalogue reads no LM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import safetensors.numpy

from data_pipeline import storage
from data_pipeline.item_ids.text_config import TextConfig

log = logging.getLogger("recllm.item_text")

TextEncoder = Callable[[list[str]], np.ndarray]
"""Texts -> [len(texts), hidden] float32 raw vectors."""


def item_documents(columns: dict[str, list[str | None]], fields: Sequence[str]) -> list[str]:
    """One document per item: its non-empty ``fields`` joined by newlines ('' for an item with none)."""
    count = len(next(iter(columns.values()))) if columns else 0
    return ["\n".join(v.strip() for f in fields if (v := columns[f][i]) and v.strip()) for i in range(count)]


def cache_key(documents: Sequence[str], reader_id: str, cfg: TextConfig) -> str:
    """sha256 of everything the raw vectors depend on: the texts, the reader's weights, layer and token budget."""
    digest = hashlib.sha256(json.dumps({"reader": reader_id, "layer": cfg.layer, "max_tokens": cfg.max_tokens},
                                       sort_keys=True).encode())
    for doc in documents:
        digest.update(doc.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def whiten(raw: np.ndarray, dims: int, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """PCA whitening (centre, rotate onto the top ``dims`` principal axes, scale each to unit variance), then unit
    rows: cosine similarity of raw LM states is dominated by a few shared directions; after whitening it ranks
    items by what their texts say. The transform is fitted on ``fit_rows`` (bool; all rows when None) and applied
    to every row, so rows outside the fit (new items) never move the others. Deterministic: SVD of the same
    matrix, signs fixed by each axis's largest entry."""
    fit = raw.astype(np.float64) if fit_rows is None else raw[fit_rows].astype(np.float64)
    mean = fit.mean(0)
    _, singular, axes = np.linalg.svd(fit - mean, full_matrices=False)
    dims = min(dims, int((singular > singular[0] * 1e-6).sum()))
    axes = axes[:dims] * np.sign(axes[:dims][np.arange(dims), np.abs(axes[:dims]).argmax(1)])[:, None]
    white = (raw.astype(np.float64) - mean) @ axes.T / singular[:dims] * np.sqrt(max(len(fit) - 1, 1))
    return (white / np.maximum(np.linalg.norm(white, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def trained_items(train_histories: Sequence[Sequence[int]], train_targets: np.ndarray, num_items: int) -> np.ndarray:
    """Bool per item_id: the item is in some train row, as history or target (what a model learns a row for)."""
    seen = np.zeros(num_items, dtype=bool)
    seen[np.asarray(train_targets, dtype=np.int64)] = True
    flat = [i for h in train_histories for i in h]
    if flat:
        seen[np.asarray(flat, dtype=np.int64)] = True
    return seen


def _write_whole(uri: str, data: bytes) -> None:
    """A cache file appears whole or not at all: locally a temporary name renamed over it; on s3:// one PUT."""
    if not storage.is_local(uri):
        storage.write_bytes(uri, data)
        return
    temporary = f"{uri}.tmp-{os.getpid()}"
    storage.write_bytes(temporary, data)
    os.replace(temporary, uri)


def build_text_vectors(items: pa.Table, cfg: TextConfig, cache_uri: Callable[[str], str], encode: TextEncoder,
                       reader_id: str, trained: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """([num_items, dims] unit text vectors, zero rows for items without text; stats). ``cache_uri(key)`` is where
    the raw vectors of a key live (read when present, written after a reader pass). The whitening is fitted on the
    ``trained`` items with text (bool per item; all when None or when too few), so items added to the catalogue
    later leave every trained item's vector as it was."""
    start = time.perf_counter()
    documents = item_documents({f: items.column(f).to_pylist() for f in cfg.fields}, cfg.fields)
    has_text = np.array([bool(d) for d in documents])
    present = [d for d in documents if d]
    key = cache_key(present, reader_id, cfg)
    uri = cache_uri(key)
    cached = storage.exists(uri)
    if cached:
        raw = safetensors.numpy.load(storage.read_bytes(uri))["raw"]
        log.info("item text vectors: cache hit %s", uri)
    else:
        raw = np.asarray(encode(present), np.float32)
        _write_whole(uri, safetensors.numpy.save({"raw": raw}))
    fit = None if trained is None else np.asarray(trained, dtype=bool)[has_text]
    if fit is not None and fit.sum() <= cfg.dims:
        fit = None
    white = whiten(raw, cfg.dims, fit)
    vectors = np.zeros((len(documents), white.shape[1]), np.float32)
    vectors[has_text] = white
    stats = {"reader": cfg.reader, "checkpoint": cfg.checkpoint, "fields": list(cfg.fields), "layer": cfg.layer,
             "max_tokens": cfg.max_tokens, "dims": int(white.shape[1]), "items_with_text": int(has_text.sum()),
             "whitening_fitted_on": int(has_text.sum() if fit is None else fit.sum()),
             "cache": uri, "cache_hit": cached, "seconds": round(time.perf_counter() - start, 2)}
    return vectors, stats
