"""Item text in the multinomial scorer (``text.vectors``): the LM-read text vectors of item_ids/ enter the top-K
score in two ways.

* A text expert: each item's score gains ``weight`` x the cosine of its text vector with the mean vector of the
  user's last ``history`` items (a product of experts with the ID model; the weight is chosen on valid users by
  `recllm infer`, 0 turns it off).
* Rows for untrained items: an item that no train sequence holds (new since training, or held out as cold) has an
  output row the model never learned. Its row is replaced by the mean of the rows of its ``neighbours`` nearest
  trained items in text space, weighted by a softmax of their cosines; the LM head being linear, its logit is the
  same mean of those items' logits (plus a bias chosen on valid), so no hidden state and no new token is needed.

Scores are normalised over the trained items only, so adding items to the catalogue leaves every trained item's
score for a user unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from data_pipeline.item_ids.text_vectors import trained_items  # noqa: F401  (the scorer's notion of trained)


class TextExpert:
    def __init__(self, vectors: np.ndarray, trained: np.ndarray, history: int, weight: float,
                 neighbours: int = 20, temperature: float = 0.05, untrained_bias: float = 0.0):
        """``vectors`` [items, dims] unit rows (zero without text); ``trained`` bool per item: seen in training.
        ``untrained_bias`` is added to every untrained item's logit: a mean of neighbours' logits is shrunk toward
        their average, so it sits below the logits the model learned; the bias is chosen on valid users."""
        self.untrained_bias = untrained_bias
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.trained = torch.from_numpy(np.asarray(trained, dtype=bool))
        self.history, self.weight = history, weight
        self.untrained_ids = torch.nonzero(~self.trained).flatten()
        self.trained_ids = torch.nonzero(self.trained).flatten()
        self.untrained_mix = self._neighbour_weights(neighbours, temperature)

    def _neighbour_weights(self, neighbours: int, temperature: float,
                           max_scores: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices into the trained items [untrained, k], weights [untrained, k]): each untrained item's ``k``
        most text-similar trained items and softmax(cos / temperature) over them (rows sum to 1). The cosines are
        computed ``max_scores`` at a time, so a million-item catalogue never holds an [untrained, trained] matrix."""
        if not len(self.untrained_ids) or not len(self.trained_ids):
            return None
        trained = self.vectors[self.trained_ids]
        k = min(neighbours, len(self.trained_ids))
        rows = max(1, max_scores // len(self.trained_ids))
        indices, weights = [], []
        for start in range(0, len(self.untrained_ids), rows):
            top = (self.vectors[self.untrained_ids[start:start + rows]] @ trained.T).topk(k, dim=1)
            indices.append(top.indices)
            weights.append(torch.softmax(top.values / temperature, dim=1))
        return torch.cat(indices), torch.cat(weights)

    def item_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, items] logits with each untrained item's replaced by its text neighbours' mix, normalised to
        log-probabilities over the trained items."""
        logits = logits.float().clone()
        trained = self.trained_ids.to(logits.device)
        if self.untrained_mix is not None:
            indices, weights = (t.to(logits.device) for t in self.untrained_mix)
            neighbour_logits = logits[:, trained][:, indices]  # [B, untrained, k]
            logits[:, self.untrained_ids.to(logits.device)] = (neighbour_logits * weights).sum(-1) + self.untrained_bias
        return logits - torch.logsumexp(logits[:, trained], dim=-1, keepdim=True)

    def text_scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, items]: cosine of every item's text vector with the mean of the user's last ``history`` vectors."""
        queries = torch.zeros(len(histories), self.vectors.shape[1])
        for row, history in enumerate(histories):
            last = list(history)[-self.history:]
            if last:
                queries[row] = self.vectors[torch.as_tensor(last)].mean(0)
        queries = queries / queries.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return queries @ self.vectors.T

    def scores(self, logits: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """The scorer's item scores: ``item_logits`` plus ``weight`` x ``text_scores``."""
        out = self.item_logits(logits)
        if self.weight:
            out = out + self.weight * self.text_scores(histories).to(out.device)
        return out
