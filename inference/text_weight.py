"""The text expert's weight, chosen on valid users before `recllm infer` scores anyone (``infer.text_weight`` empty,
multinomial scorer, item text vectors in item_ids/). The model scores the seeded valid sample once; each weight
of ``infer.text_weights`` re-ranks those scores, and the best valid NDCG@10 wins (the smaller weight on a tie).
Reads sequences/valid only: test targets are read by `evaluate` alone.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from data_pipeline.run_layout import RunLayout

log = logging.getLogger("recllm.infer")


def weight_sweep(scorer, user_ids: np.ndarray, histories: list[list[int]], targets: np.ndarray,
                 weights: list[float], exclude_seen: bool) -> dict[float, float]:
    """{weight: NDCG@10} of ``scorer`` (a multinomial TopKScorer with a text expert) on the given users."""
    from ranking.multinomial_head import item_logits
    from ranking.ranking_metrics import ndcg_at_k

    text = scorer.text
    tops = {w: [] for w in weights}
    for start in range(0, len(user_ids), scorer.cfg.batch_size):
        u, h = user_ids[start:start + scorer.cfg.batch_size], histories[start:start + scorer.cfg.batch_size]
        ids, mask = scorer._encode(u, h)
        base = text.item_logits(item_logits(scorer.model, ids, mask, scorer.item_token_ids))
        similarity = text.text_scores(h).to(base.device)
        if exclude_seen:
            for row, items in enumerate(h):
                base[row, torch.as_tensor(list(items), dtype=torch.long, device=base.device)] = float("-inf")
        for w in weights:
            top = (base + w * similarity).topk(min(10, base.shape[1]), dim=-1).indices.cpu().numpy()
            tops[w].append(scorer.items[top])
    return {w: float(ndcg_at_k(np.concatenate(t), targets, 10)) for w, t in tops.items()}


def choose_text_weight(cfg, model_dir: str, num_items: int, num_users: int) -> tuple[float, dict[float, float]]:
    """(the chosen weight, {weight: valid NDCG@10}); (0.0, {}) when the run has no text vectors."""
    from ranking.topk_scorer import TopKScorer
    from trainers.validation import valid_sample

    icfg = dataclasses.replace(cfg.infer, text_weight=0.0, use_gpu=cfg.infer.use_gpu)
    device = "cuda" if icfg.use_gpu else "cpu"
    scorer = TopKScorer.from_model_dir(cfg.run_dir, model_dir, icfg, num_items, num_users, device)
    if scorer.text is None:
        return 0.0, {}
    valid = RunLayout(cfg.run_dir).read_sequences("valid").sort_by("user_id")
    rows = valid_sample(valid.num_rows, cfg.train.eval_users, cfg.seed)
    histories = valid.column("history").to_pylist()
    sweep = weight_sweep(scorer, valid.column("user_id").to_numpy()[rows], [histories[r] for r in rows],
                         valid.column("target").to_numpy()[rows], sorted(set(icfg.text_weights)), icfg.exclude_seen)
    best = max(sweep, key=lambda w: (sweep[w], -w))
    log.info("text weight %s chosen on %d valid users: %s", best, len(rows), sweep)
    return best, sweep
