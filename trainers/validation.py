"""Valid-split scoring while training (``train.eval_every``): HR@10 / NDCG@10 of the model in training on a
fixed, seeded sample of valid users, with the scorer and prompt format `recllm infer` uses. Each rank scores
its share of the users and the sums are all-reduced, so every rank takes the same keep/stop decision. Reads
sequences/valid only: test targets are read by `evaluate` alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_pipeline.run_layout import RunLayout
from ranking.scorer_settings import ScorerSettings

VALID_METRIC = "valid/NDCG@10"
"""The score checkpoint selection and early stopping compare."""


def valid_sample(num_rows: int, users: int, seed: int) -> np.ndarray:
    """Row indices of the fixed valid sample: ``users`` rows drawn once from the seed (all rows when 0)."""
    if not users or users >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng([seed, 11]).choice(num_rows, size=users, replace=False))


class ValidationRound:
    def __init__(self, settings: ScorerSettings, eval_users: int, seed: int, run_dir: str, tokenizer, prompt_format,
                 rank: int, world: int, device: str):
        from ranking.topk_scorer import TopKScorer

        layout = RunLayout(run_dir)
        counts = layout.read_manifest()["counts"]
        valid = layout.read_sequences("valid").sort_by("user_id")
        rows = valid_sample(valid.num_rows, eval_users, seed)
        share = -(-len(rows) // world)
        # Every rank runs the same number of forward passes (ZeRO-3 gathers inside each one): pad the share
        # with repeats of its first row and leave the padding out of the sums.
        mine = rows[rank::world]
        self.real = len(mine)
        mine = np.concatenate([mine, np.full(share - len(mine), mine[0] if len(mine) else rows[0])])
        self.users = valid.column("user_id").to_numpy()[mine]
        histories = valid.column("history").to_pylist()
        self.histories = [histories[i] for i in mine]
        self.targets = valid.column("target").to_numpy()[mine]
        self.total = len(rows)
        top_k = max(settings.top_k, 10)
        settings = dataclasses.replace(settings, top_k=top_k, num_beams=max(settings.num_beams, top_k))
        self.scorer = TopKScorer(run_dir, None, tokenizer, prompt_format, settings, counts["items"], counts["users"],
                                 device)

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        """{valid/HR@10, valid/NDCG@10} over the whole sample (every rank gets the same numbers)."""
        from ranking.ranking_metrics import hit_rate_at_k, ndcg_at_k

        was_training = model.training
        model.eval()
        self.scorer.model = model
        try:
            items, _ = self.scorer.score(self.users, self.histories)
        finally:
            self.scorer.model = None
            model.train(was_training)
        items, targets = items[:self.real], self.targets[:self.real]
        sums = torch.tensor([hit_rate_at_k(items, targets, 10) * self.real, ndcg_at_k(items, targets, 10) * self.real],
                            dtype=torch.float64, device=self.scorer.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        return {"valid/HR@10": sums[0].item() / self.total, VALID_METRIC: sums[1].item() / self.total}
