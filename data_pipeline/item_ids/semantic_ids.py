"""The semantic scheme (Semantic Convergence): collaborative item embeddings (the baseline's, which the build-ids
stage reads from run_dir/baseline/) -> trained residual quantiser -> collision-free L x C code sequences, with
per-level usage statistics; and cold-start assignment, which codes items new to the catalogue with a frozen
codebook. Called by the build-ids stage; the bench calls ``quantise_catalogue`` directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from data_pipeline.item_ids.collisions import collision_counts, resolve_collisions
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.item_ids.item_codes import (BuiltIds, code_matrix, item_codes_table, semantic_token,
                                              semantic_vocabulary)
from data_pipeline.item_ids.residual_quantizer import (LatentDistancePreference, ResidualQuantizer, load_quantizer,
                                                       pinned_threads, quantizer_tensors, train_quantizer)

log = logging.getLogger("recllm.item_ids")

RESOLUTION_RULE = ("the item nearest its code keeps a shared sequence; the others take the nearest free code at "
                   "the last level under their own prefix (the nearer item first when two want the same one), "
                   "backing off a level only where that prefix is full; no extra level is appended")


def code_usage(codes: np.ndarray, num_codes: int) -> list[dict]:
    """Per level: codes used, utilisation (used / C) and perplexity (exp of the code distribution's entropy)."""
    usage = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=num_codes)
        p = counts[counts > 0] / counts.sum()
        usage.append({"level": level, "used_codes": int((counts > 0).sum()),
                      "utilisation": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    return usage


@dataclass
class SemanticCodes:
    codes: np.ndarray
    """[N, L] collision-free codes."""
    model: ResidualQuantizer
    stats: dict


@pinned_threads()  # collision resolution's matrix products too: codes must not depend on the thread count
def quantise_catalogue(embeddings: np.ndarray, cfg: IdsConfig, seed: int, text_targets: np.ndarray | None = None,
                       text_mask: np.ndarray | None = None) -> SemanticCodes:
    """Train the quantiser on every item, code every item, resolve collisions."""
    trained = train_quantizer(embeddings, cfg, seed, text_targets, text_mask)
    model = trained.model.eval()
    start = time.perf_counter()
    codes, latents, errors = model.encode_codes(torch.as_tensor(np.asarray(embeddings, np.float32)))
    before = collision_counts(codes, cfg.codes)
    preference = LatentDistancePreference(model.codebooks.detach().numpy(), latents, codes)
    resolved, report = resolve_collisions(codes, cfg.codes, preference, priority=errors)
    after = collision_counts(resolved, cfg.codes)
    log.info("collisions: %d duplicate sequences before, %d after (%d items reassigned)",
             before["duplicate_codes"], after["duplicate_codes"], report["reassigned_items"])
    final = {k: v for k, v in trained.history[-1].items() if k != "epoch"} if trained.history else {}
    stats = {
        "levels": cfg.levels, "codes": cfg.codes,
        "collisions": {"before": before, "after": after, "resolution": RESOLUTION_RULE, **report},
        "levels_usage": code_usage(resolved, cfg.codes),
        "levels_usage_before_resolution": code_usage(codes, cfg.codes),
        "quantisation_mse": float(errors.mean() / latents.shape[1]),
        "quantisation_relative_error": float(errors.sum() / ((latents - latents.mean(0)) ** 2).sum()),
        "losses": {"final": final, "per_epoch": trained.history},
        "seconds": {"train": round(trained.seconds, 2), "encode_and_resolve": round(time.perf_counter() - start, 2)},
    }
    return SemanticCodes(resolved, model, stats)


def _tokens(codes: np.ndarray) -> list[list[str]]:
    return [[semantic_token(level, int(c)) for level, c in enumerate(row)] for row in codes]


def build_semantic_ids(items: pa.Table, embeddings: np.ndarray, cfg: IdsConfig, seed: int,
                       text_targets: np.ndarray | None = None, text_mask: np.ndarray | None = None) -> BuiltIds:
    if len(embeddings) != items.num_rows:
        raise ValueError(f"{len(embeddings)} item embeddings for {items.num_rows} items")
    result = quantise_catalogue(embeddings, cfg, seed, text_targets, text_mask)
    tensors, metadata = quantizer_tensors(result.model)
    # Row i is the quantiser input of item_codes row i: assign_only aligns new embeddings to this space.
    tensors["item_embeddings"] = torch.as_tensor(np.asarray(embeddings, np.float32)).contiguous()
    return BuiltIds(item_codes_table(items, result.codes, _tokens(result.codes)),
                    semantic_vocabulary(cfg.levels, cfg.codes), result.stats, codebook=(tensors, metadata))


def _fit_linear_map(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares [source, 1] @ W ~ target; returns (W, R^2)."""
    design = np.hstack([source, np.ones((len(source), 1), source.dtype)]).astype(np.float64)
    weights, *_ = np.linalg.lstsq(design, target.astype(np.float64), rcond=None)
    residual = ((design @ weights - target) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return weights, float(1.0 - residual / max(total, 1e-12))


@pinned_threads()
def assign_new_items(items: pa.Table, embeddings: np.ndarray, existing: pa.Table, codebook: tuple[dict, dict]
                     ) -> BuiltIds:
    """Code the items of ``items`` absent from ``existing`` (matched on source_id) with the frozen codebook.

    Known items keep their codes; every existing sequence stays reserved. ``embeddings`` (one row per item of
    ``items``) come from the baseline retrained on the grown catalogue: they are mapped into the codebook's input
    space by a least-squares fit on the known items.
    """
    tensors, metadata = codebook
    model = load_quantizer(tensors, metadata)
    num_codes, levels = model.num_codes, model.levels
    reference = tensors["item_embeddings"].numpy()
    old_codes = code_matrix(existing)
    row_of = {s: i for i, s in enumerate(existing.column("source_id").to_pylist())}
    sources = items.column("source_id").to_pylist()
    known_rows = np.array([row_of.get(s, -1) for s in sources])
    known = known_rows >= 0
    new_idx = np.flatnonzero(~known)
    if len(embeddings) != items.num_rows:
        raise ValueError(f"{len(embeddings)} item embeddings for {items.num_rows} items")
    embeddings = np.asarray(embeddings, np.float32)
    if known.sum() <= embeddings.shape[1]:
        raise ValueError(f"only {int(known.sum())} items are known to the codebook; at least "
                         f"{embeddings.shape[1] + 1} are needed to map new embeddings into its space")
    weights, fit_r2 = _fit_linear_map(embeddings[known], reference[known_rows[known]])
    mapped = (np.hstack([embeddings[new_idx], np.ones((len(new_idx), 1), np.float32)]) @ weights).astype(np.float32)
    new_codes, latents, errors = model.encode_codes(torch.from_numpy(mapped))
    if not len(new_idx):
        log.info("assign_only: every item already has a code")
    all_codes = np.concatenate([old_codes, new_codes])
    frozen = np.arange(len(all_codes)) < len(old_codes)
    priority = np.concatenate([np.zeros(len(old_codes)), errors])
    offset = len(old_codes)
    all_latents = np.concatenate([np.zeros((offset, latents.shape[1]), np.float32), latents])  # frozen rows never move
    preference = LatentDistancePreference(model.codebooks.detach().numpy(), all_latents, all_codes)
    resolved, report = resolve_collisions(all_codes, num_codes, preference, priority=priority, frozen=frozen)
    codes = np.zeros((items.num_rows, levels), np.int64)
    codes[known] = old_codes[known_rows[known]]
    codes[new_idx] = resolved[offset:]
    out_embeddings = np.zeros((items.num_rows, reference.shape[1]), np.float32)
    out_embeddings[known] = reference[known_rows[known]]
    out_embeddings[new_idx] = mapped
    out_tensors = {**tensors, "item_embeddings": torch.from_numpy(out_embeddings)}
    stats = {
        "levels": levels, "codes": num_codes,
        "assign_only": {"known_items": int(known.sum()), "new_items": int(len(new_idx)),
                        "embedding_map_r2_on_known_items": round(fit_r2, 6)},
        "collisions": {"before": collision_counts(all_codes, num_codes),  # existing and new items together
                       "after": collision_counts(codes, num_codes), "resolution": RESOLUTION_RULE, **report},
        "levels_usage": code_usage(codes, num_codes),
    }
    log.info("assign_only: %d known items kept their codes, %d new items coded (%d reassigned)",
             int(known.sum()), len(new_idx), report["reassigned_items"])
    return BuiltIds(item_codes_table(items, codes, _tokens(codes)), semantic_vocabulary(levels, num_codes), stats,
                    codebook=(out_tensors, metadata))
