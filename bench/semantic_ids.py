"""Bench of the semantic-ID quantiser: N synthetic items x D dims -> L x C collision-free codes, on CPU.

Runs ``quantise_catalogue``, the very code the build-ids stage runs (k-means initialisation, residual
quantiser with the behaviour-alignment losses, collision resolution); the LLM-alignment loss is off because
synthetic items have no text. Prints seconds and the collision rate before and after resolution.

    python bench/semantic_ids.py                      # 1M x 64, 4 x 256 (goal: <= 120 s on 2 cores, 0 collisions)
    python bench/semantic_ids.py --items 100000 --epochs 3
    python bench/semantic_ids.py --data tight_clusters   # stress: ~half the items collide before resolution
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.item_ids.config import IdsConfig  # noqa: E402
from data_pipeline.item_ids.semantic_ids import quantise_catalogue  # noqa: E402


def synthetic_embeddings(items: int, dim: int, seed: int) -> np.ndarray:
    """Shaped like trained SASRec item embeddings: 1,000 topics (half the variance) plus per-item variation, with
    the slowly decaying spectrum measured on Scientific's (variance of direction k ~ k^-0.7; 13-14 of 64
    directions hold half the variance; nearest neighbour at ~0.6 of the median distance, as there).
    """
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1, dtype=np.float32) ** -0.35)
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    topics = rng.standard_normal(size=(1000, dim), dtype=np.float32)
    out = topics[rng.integers(0, 1000, size=items)]
    out += rng.standard_normal(size=out.shape, dtype=np.float32)
    out *= scale * np.float32(np.sqrt(0.5))
    return out @ rotation


def tight_cluster_embeddings(items: int, dim: int, seed: int) -> np.ndarray:
    """Stress case: 20,000 tight sub-topics of ~50 near-duplicate items each, isotropic in all 64 dims. 32 bits of
    residual codes cannot separate the items of one sub-topic, so about half collide before resolution."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(1000, dim)).astype(np.float32)
    subtopics = topics.repeat(20, axis=0) + 0.5 * rng.normal(size=(20000, dim)).astype(np.float32)
    popularity = rng.lognormal(0.0, 1.0, size=20000)
    out = subtopics[rng.choice(20000, size=items, p=popularity / popularity.sum())]
    out += 0.3 * rng.standard_normal(size=out.shape, dtype=np.float32)
    return out


DATA = {"sasrec_like": synthetic_embeddings, "tight_clusters": tight_cluster_embeddings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the catalogue (1M items: 3 x 123 steps)")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--data", choices=sorted(DATA), default="sasrec_like")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and OpenMP threads (0: library defaults). On shared cores one thread is much faster: "
                             "OpenMP workers spin while waiting for a busy core")
    parser.add_argument("--json", type=str, default="", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # scikit-learn's k-means and numpy's BLAS

    start = time.perf_counter()
    embeddings = DATA[args.data](args.items, args.dim, args.seed)
    generated = time.perf_counter() - start
    cfg = IdsConfig(levels=args.levels, codes=args.codes, epochs=args.epochs, batch_size=args.batch_size,
                    llm_alignment=False)
    problems = cfg.check()
    if problems:
        parser.error("; ".join(problems))
    start = time.perf_counter()
    result = quantise_catalogue(embeddings, cfg, args.seed)
    seconds = time.perf_counter() - start
    before, after = result.stats["collisions"]["before"], result.stats["collisions"]["after"]
    report = {
        "data": args.data, "items": args.items, "dim": args.dim, "levels": args.levels, "codes": args.codes, "epochs": args.epochs,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1), "seconds_train": result.stats["seconds"]["train"],
        "seconds_encode_and_resolve": result.stats["seconds"]["encode_and_resolve"],
        "seconds_generate_data": round(generated, 1),
        "collision_rate_before": before["collision_rate"], "collision_rate_after": after["collision_rate"],
        "duplicate_codes_before": before["duplicate_codes"], "duplicate_codes_after": after["duplicate_codes"],
        "reassigned_items": result.stats["collisions"]["reassigned_items"],
        "reassigned_by_depth_first_search": result.stats["collisions"]["reassigned_by_depth_first_search"],
        "reassigned_above_last_level": result.stats["collisions"]["reassigned_above_last_level"],
        "levels_usage": [{k: round(v, 3) for k, v in u.items()} for u in result.stats["levels_usage"]],
        "final_losses": {k: round(v, 4) for k, v in result.stats["losses"]["final"].items()},
    }
    print(f"semantic ids ({args.data}): {args.items:,} items x {args.dim} dims, {args.levels} x {args.codes} codes: "
          f"{seconds:.1f} s (train {report['seconds_train']} s, encode+resolve {report['seconds_encode_and_resolve']} s); "
          f"collision rate {before['collision_rate']:.4%} before, {after['collision_rate']:.4%} after resolution")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if after["duplicate_codes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
