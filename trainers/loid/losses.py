"""The LoID objective, plain torch: rating MSE (L_rec), the attention that lets an ID embedding read the other
side's review vectors, and the in-batch triplet margin loss (L_cl). L = L_rec + lambda * L_cl (model.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rating_mse(pred: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
    """L_rec: mean squared error between predicted and true ratings."""
    return F.mse_loss(pred.float(), rating.float())


def attend_all(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every query reads every key set: out[b, j] = sum_k softmax_k(q_b . K_jk / sqrt(d)) V_jk.

    queries [B, d]; keys, values [N, K, d]; mask [N, K] (True = a real review). Returns [B, N, d]; a set with
    no real review gives a zero vector.
    """
    scores = torch.einsum("bd,nkd->bnk", queries, keys) / math.sqrt(queries.shape[-1])
    scores = scores.masked_fill(~mask.unsqueeze(0), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf (no review) -> 0 weights
    return torch.einsum("bnk,nkd->bnd", weights, values)


def in_batch_triplet_loss(anchors: torch.Tensor, candidates: torch.Tensor, same: torch.Tensor,
                          usable: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet margin loss with in-batch negatives.

    anchors [B, d]; candidates [B, B, d] where candidates[b, b] is anchor b's positive and candidates[b, j]
    (j != b) a negative; same [B, B] marks pairs that must not be negatives (same item or user as the
    positive); usable [B] marks candidates that exist (a non-empty review history). Loss = mean over valid
    (b, j) of max(0, ||a_b - p_b|| - ||a_b - n_bj|| + margin), Euclidean distances.
    """
    dist = torch.linalg.vector_norm(anchors.unsqueeze(1) - candidates, dim=-1)  # [B, B]
    pos = dist.diagonal().unsqueeze(1)
    eye = torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
    valid = ~eye & ~same & usable.unsqueeze(0) & usable.unsqueeze(1)
    if not valid.any():
        return anchors.sum() * 0.0  # keeps the graph (DeepSpeed needs every step to backward)
    return torch.relu(pos - dist + margin)[valid].mean()
