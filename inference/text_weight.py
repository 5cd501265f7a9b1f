"""The text expert's weight and the untrained items' bias, chosen on valid users before `recllm infer` scores anyone
(multinomial scorer, item text vectors in item_ids/; a value fixed in infer.* is kept). The model scores the seeded
valid sample once; each (weight, bias) pair of ``infer.text_weights`` x ``infer.text_untrained_biases`` re-ranks
those scores, and the best valid NDCG@10 wins (the smaller weight, then bias, on a tie). Reads sequences/valid
only: test targets are read by `evaluate` alone.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from data_pipeline.run_layout import RunLayout

log = logging.getLogger("recllm.infer")


def weight_sweep(scorer, user_ids: np.ndarray, histories: list[list[int]], targets: np.ndarray,
                 weights: list[float], exclude_seen: bool, biases: list[float] = (0.0,)) -> dict[tuple, float]:
    """{(weight, untrained bias): NDCG@10} of ``scorer`` (a multinomial TopKScorer with a text expert, bias 0) on
    the given users: one forward pass, every pair a re-ranking of it."""
    from ranking.multinomial_head import item_logits
    from ranking.ranking_metrics import ndcg_at_k

    text = scorer.text
    untrained = text.untrained_ids
    tops = {(w, b): [] for w in weights for b in biases}
    for start in range(0, len(user_ids), scorer.settings.batch_size):
        u, h = user_ids[start:start + scorer.settings.batch_size], histories[start:start + scorer.settings.batch_size]
        ids, mask = scorer._encode(u, h)
        base = text.item_logits(item_logits(scorer.model, ids, mask, scorer.item_token_ids))
        similarity = text.text_scores(h).to(base.device)
        if exclude_seen:
            for row, items in enumerate(h):
                base[row, torch.as_tensor(list(items), dtype=torch.long, device=base.device)] = float("-inf")
        for b in biases:
            shifted = base.clone()
            shifted[:, untrained.to(base.device)] += b  # normalised over trained items: only untrained rows move
            for w in weights:
                top = (shifted + w * similarity).topk(min(10, base.shape[1]), dim=-1).indices.cpu().numpy()
                tops[(w, b)].append(scorer.items[top])
    return {pair: float(ndcg_at_k(np.concatenate(t), targets, 10)) for pair, t in tops.items()}


def choose_text_weight(cfg, model_dir: str, num_items: int, num_users: int) -> tuple[float, float, dict]:
    """(the chosen weight, the chosen untrained-item bias, {"weight,bias": valid NDCG@10}); (0.0, 0.0, {}) when the
    run has no text vectors. A weight or bias fixed in infer.* is the only one tried."""
    from ranking.topk_scorer import TopKScorer
    from trainers.validation import valid_sample

    weights = [cfg.infer.text_weight] if cfg.infer.text_weight is not None else sorted(set(cfg.infer.text_weights))
    biases = ([cfg.infer.text_untrained_bias] if cfg.infer.text_untrained_bias is not None
              else sorted(set(cfg.infer.text_untrained_biases)))
    icfg = dataclasses.replace(cfg.infer, text_weight=0.0, text_untrained_bias=0.0)
    device = "cuda" if icfg.use_gpu else "cpu"
    scorer = TopKScorer.from_model_dir(cfg.run_dir, model_dir, icfg.scorer_settings(), num_items, num_users, device)
    if scorer.text is None:
        return 0.0, 0.0, {}
    valid = RunLayout(cfg.run_dir).read_sequences("valid").sort_by("user_id")
    rows = valid_sample(valid.num_rows, cfg.train.eval_users, cfg.seed)
    histories = valid.column("history").to_pylist()
    sweep = weight_sweep(scorer, valid.column("user_id").to_numpy()[rows], [histories[r] for r in rows],
                         valid.column("target").to_numpy()[rows], weights, icfg.exclude_seen, biases)
    best = max(sweep, key=lambda pair: (sweep[pair], -pair[0], -pair[1]))  # ties: the smaller weight, then bias
    log.info("text weight %s, untrained bias %s chosen on %d valid users", best[0], best[1], len(rows))
    return best[0], best[1], {f"{w:g},{b:g}": v for (w, b), v in sweep.items()}
