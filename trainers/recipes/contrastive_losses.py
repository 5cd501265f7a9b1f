"""ControlRec's contrastive objectives as pure functions of pooled decoder states: heterogeneous feature
matching (HFM: ID representation vs item description, user history vs next item's description) and
instruction contrastive learning (ICL) with its linear weight schedule. The ControlRec objective calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, L, H] states, [N, L] 0/1 mask -> [N, H] mean over the unmasked positions."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def contrastive_ce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax cross-entropy over cosine similarities; candidate 0 of each anchor is the positive.

    anchors [A, H], candidates [A, C, H] -> mean over anchors of -log softmax(cos(a, c) / T)[0].
    """
    sims = F.cosine_similarity(anchors.unsqueeze(1).float(), candidates.float(), dim=-1) / temperature
    return F.cross_entropy(sims, torch.zeros(len(anchors), dtype=torch.long, device=sims.device))


def in_batch_candidates(positives: torch.Tensor) -> torch.Tensor:
    """[B, H] positives -> [B, B, H]: row i holds positive i first, then the other B - 1 as negatives."""
    b = len(positives)
    order = torch.stack([torch.roll(torch.arange(b), -i) for i in range(b)]).to(positives.device)
    return positives[order]


def hfm_loss(id_vecs: torch.Tensor, description_vecs: torch.Tensor, history_vecs: torch.Tensor,
             next_description_vecs: torch.Tensor, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Item-description matching + sequence-prediction matching, each with in-batch negatives (K = B - 1)."""
    item_term = contrastive_ce(id_vecs, in_batch_candidates(description_vecs), temperature)
    sequence_term = contrastive_ce(history_vecs, in_batch_candidates(next_description_vecs), temperature)
    return item_term + sequence_term, {"hfm/item_description": item_term.item(),
                                       "hfm/sequence_prediction": sequence_term.item()}


def icl_loss(anchor_vecs: torch.Tensor, positive_vecs: torch.Tensor, negative_vecs: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """anchor [A, H] vs its paraphrase [A, H] (positive) and M instructions of other tasks [A, M, H]."""
    return contrastive_ce(anchor_vecs, torch.cat([positive_vecs.unsqueeze(1), negative_vecs], 1), temperature)


def icl_weight(step: int, total_steps: int, lambda0: float) -> float:
    """lambda_t = lambda0 + (1 - lambda0) * t / T (ControlRec's schedule), t counted from 0."""
    return lambda0 + (1.0 - lambda0) * min(step, total_steps) / max(total_steps, 1)
