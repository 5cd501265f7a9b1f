"""Stage 2 of the flow: run_dir/dataset/ -> run_dir/item_ids/ (how the LM names every item).

Picks the scheme, gathers its inputs and writes item_codes.parquet, tokens.json, stats.json and, for
semantic, codebook.safetensors through one staged folder, so a failed run leaves no item_ids/. The inputs that
come from a model are given to it, never built here: the baseline's item embeddings (read from run_dir/baseline/,
written by `recllm train-baseline`), the LM's text embedder and its tokenizer (passed in by the CLI stage).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import safetensors.numpy
import safetensors.torch

from data_pipeline import storage
from data_pipeline.baseline_files import baseline_dir, read_item_embeddings
from data_pipeline.errors import DataError
from data_pipeline.item_ids.atomic_ids import build_atomic_ids
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.item_ids.item_codes import BuiltIds
from data_pipeline.item_ids.llm_text_targets import TextEmbedder, TextTargetsUnavailable, item_texts
from data_pipeline.item_ids.precomputed_ids import build_precomputed_ids, index_path_from_manifest
from data_pipeline.item_ids.subtoken_ids import build_subtoken_ids
from data_pipeline.item_ids.text_config import TextConfig
from data_pipeline.item_ids.text_vectors import TextEncoder, build_text_vectors, trained_items
from data_pipeline.run_layout import (CODEBOOK_FILE, ITEM_CODES_FILE, STATS_FILE, TEXT_VECTORS_FILE, TOKENS_FILE,
                                      RunLayout, read_item_codes)

log = logging.getLogger("recllm.item_ids")


def load_codebook(item_ids_dir: str) -> tuple[dict, dict]:
    """(tensors, metadata) of an item_ids/ folder's codebook.safetensors (local or s3://)."""
    uri = storage.join(item_ids_dir, CODEBOOK_FILE)
    data = storage.read_bytes(uri)
    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    return safetensors.torch.load(data), metadata


def codebook_bytes(tensors: dict, metadata: dict[str, str]) -> bytes:
    """codebook.safetensors, byte-identical for identical tensors: safetensors writes ``__metadata__`` in its
    hash map's per-process random order, so the header is rewritten with the keys sorted (same length)."""
    data = safetensors.torch.save(tensors, metadata)
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    canonical = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    if len(canonical) != header_len:  # never expected: the same keys and values in another order
        return data
    return data[:8] + canonical + data[8 + header_len:]


def _text_targets(ids: IdsConfig, items: pa.Table, manifest: dict, text_embedder: TextEmbedder | None
                  ) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
    """LLM-alignment targets, or None with the reason it is off."""
    option = {"requested": ids.llm_alignment, "used": False, "weight": ids.llm_alignment_weight}
    texts = item_texts(items)
    has_text = np.array([t is not None for t in texts])
    if not ids.llm_alignment:
        return None, None, {**option, "note": "off: ids.llm_alignment=false"}
    if not manifest.get("has_text") or not has_text.any():
        log.info("LLM alignment skipped: the dataset has no item text; codes come from behaviour alone")
        return None, None, {**option, "note": "skipped: the dataset has no item text"}
    if text_embedder is None:
        log.info("LLM alignment skipped: no LM text embedder given")
        return None, None, {**option, "note": "skipped: no LM text embedder given"}
    start = time.perf_counter()
    try:
        present = np.asarray(text_embedder([t for t in texts if t is not None]), np.float32)
    except TextTargetsUnavailable as exc:
        log.info("LLM alignment skipped: %s", exc)
        return None, None, {**option, "note": f"skipped: {exc}"}
    targets = np.zeros((len(texts), present.shape[1]), np.float32)
    targets[has_text] = present
    option.update(used=True, items_with_text=int(has_text.sum()), target_dim=int(present.shape[1]),
                  seconds=round(time.perf_counter() - start, 2),
                  note="on: projected code prefixes pulled toward the LM's mean input embedding of title+description")
    return targets, has_text, option


def _baseline_embeddings(run_dir: str, num_items: int, settings: dict | None) -> tuple[np.ndarray, dict]:
    """The quantiser's input: the item embeddings of the run's baseline (run_dir/baseline/), one row per item."""
    embeddings, manifest = read_item_embeddings(run_dir, settings)
    if len(embeddings) != num_items:
        raise DataError(baseline_dir(run_dir), f"{len(embeddings)} item embeddings for {num_items} items; "
                                               "run `recllm train-baseline`")
    info = {"source": "baseline", "model": manifest["model"], "path": baseline_dir(run_dir),
            "hidden_size": int(embeddings.shape[1]), "epochs_run": len(manifest["losses"]),
            "valid_NDCG@10": manifest["valid"].get("NDCG@10")}
    return embeddings, info


def _semantic(ids: IdsConfig, items: pa.Table, manifest: dict, seed: int, item_embeddings: np.ndarray,
              embedding_info: dict, text_embedder: TextEmbedder | None) -> BuiltIds:
    from data_pipeline.item_ids.semantic_ids import build_semantic_ids

    targets, mask, llm_option = _text_targets(ids, items, manifest, text_embedder)
    built = build_semantic_ids(items, item_embeddings, ids, seed, targets, mask)
    built.stats["options"] = {"llm_alignment": llm_option, "item_embeddings": embedding_info,
                              **{k: getattr(ids, k) for k in ("latent_dim", "hidden_dim", "epochs", "batch_size",
                                                              "lr", "kmeans_sample", "commitment_weight")}}
    return built


def _assign_only(ids: IdsConfig, run_dir: str, items: pa.Table, item_embeddings: np.ndarray,
                 embedding_info: dict) -> BuiltIds:
    from data_pipeline.item_ids.semantic_ids import assign_new_items

    source = ids.assign_from or RunLayout(run_dir).item_ids
    stats_uri = storage.join(source, STATS_FILE)
    if not storage.exists(stats_uri):
        raise DataError(source, "no item_ids/ to assign from; build one first or set ids.assign_from")
    scheme = storage.read_json(stats_uri).get("scheme")
    if scheme != "semantic":
        raise DataError(source, f"assign_only needs a semantic item_ids/ (with a codebook), found scheme {scheme!r}")
    built = assign_new_items(items, item_embeddings, read_item_codes(source), load_codebook(source))
    built.stats["options"] = {"assign_from": source, "item_embeddings": embedding_info,
                              "llm_alignment": {"used": False, "note": "assign_only: frozen codebook, no training"}}
    return built


def write_item_ids(built: BuiltIds, out_uri: str) -> None:
    with storage.staged_folder(out_uri) as staged:
        staged.write_parquet(ITEM_CODES_FILE, built.items)
        for name, table in built.tables.items():
            staged.write_parquet(name, table)
        staged.write_bytes(TOKENS_FILE, json.dumps(built.new_tokens).encode())
        if built.codebook is not None:
            tensors, metadata = built.codebook
            staged.write_bytes(CODEBOOK_FILE, codebook_bytes(tensors, metadata))
        if built.text_vectors is not None:
            staged.write_bytes(TEXT_VECTORS_FILE, safetensors.numpy.save({"text_vectors": built.text_vectors}))
        built.stats["files"] = dict(sorted(staged.files.items()))
        staged.write_bytes(STATS_FILE, json.dumps(built.stats, indent=2).encode())


def run_build_ids(ids: IdsConfig, run_dir: str, seed: int = 0, *, tokenizer=None,
                  text_embedder: TextEmbedder | None = None, baseline_settings: dict | None = None,
                  item_embeddings: np.ndarray | None = None, text: TextConfig | None = None,
                  text_encoder: TextEncoder | None = None, reader_id: Callable[[], str] | None = None) -> dict:
    """Build run_dir/item_ids/ from run_dir/dataset/; returns stats.json's content.

    ``seed`` is the run's seed (``ids.seed`` overrides it for the quantiser). Inputs from the model layer:
    ``tokenizer`` (subtoken needs it), ``text_embedder`` (semantic's LLM alignment; without it alignment is
    skipped, with a note). Semantic, and subtoken with collaborative numbers, read the item embeddings of
    run_dir/baseline/, checked against ``baseline_settings`` when given; ``item_embeddings`` replaces them
    (tests, benches). ``text`` with ``vectors`` on: each item's text read by ``text_encoder`` (the reader named
    by ``reader_id()``) into text_vectors.safetensors; skipped, with a note, when the data has no text.
    """
    start = time.perf_counter()
    layout = RunLayout(run_dir)
    dataset_dir = layout.dataset
    manifest = layout.read_manifest()
    items = storage.read_parquet(layout.items).sort_by("item_id")
    seed = ids.seed if ids.seed is not None else seed
    if ids.scheme == "atomic":
        users = None
        if ids.user_tokens:
            users = storage.read_parquet(layout.users).sort_by("user_id")
        built = build_atomic_ids(items, users, ids.content_tokens)
    elif ids.scheme == "subtoken":
        if tokenizer is None:
            raise DataError("model", "scheme subtoken splits item names with the LM's tokenizer, and this model has "
                                     "none (LLaMA-2 sizes have one only with model.checkpoint)")
        vectors = None
        if ids.subtoken_numbers == "collaborative":
            vectors = (item_embeddings if item_embeddings is not None
                       else _baseline_embeddings(run_dir, items.num_rows, baseline_settings)[0])
        built = build_subtoken_ids(items, tokenizer, vectors, seed)
    elif ids.scheme == "precomputed":
        built = build_precomputed_ids(items, ids.index_path or index_path_from_manifest(manifest, dataset_dir))
    else:
        if item_embeddings is None:
            item_embeddings, embedding_info = _baseline_embeddings(run_dir, items.num_rows, baseline_settings)
        else:
            embedding_info = {"source": "given", "hidden_size": int(np.shape(item_embeddings)[1])}
        if ids.assign_only:
            built = _assign_only(ids, run_dir, items, item_embeddings, embedding_info)
        else:
            built = _semantic(ids, items, manifest, seed, item_embeddings, embedding_info, text_embedder)
    if text is not None and text.vectors:
        if not manifest.get("has_text"):
            built.stats["text_vectors"] = {"used": False, "note": "skipped: the dataset has no item text"}
        elif text_encoder is None or reader_id is None:
            raise DataError("text", "text.vectors needs a text reader; build-ids was called without one")
        else:
            train = layout.read_sequences("train", columns=["history", "target"])
            trained = trained_items(train.column("history").to_pylist(), train.column("target").to_numpy(),
                                    items.num_rows)
            cache = layout.text_vectors_cache
            if text.cache_dir:
                cache = lambda key: storage.join(text.cache_dir, f"{key}.safetensors")  # noqa: E731
            built.text_vectors, info = build_text_vectors(items, text, cache, text_encoder, reader_id(), trained)
            built.stats["text_vectors"] = {"used": True, **info}
    built.stats = {"scheme": ids.scheme, "items": items.num_rows, "seed": seed, "new_tokens": len(built.new_tokens),
                   **built.stats, "total_seconds": round(time.perf_counter() - start, 2)}
    out = layout.item_ids
    write_item_ids(built, out)
    log.info("wrote %s: %s scheme, %d items, %d new tokens", out, ids.scheme, items.num_rows, len(built.new_tokens))
    return built.stats
