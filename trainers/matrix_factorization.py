"""Rating baselines for the LoID table: the global mean of the train ratings and a biased matrix
factorisation (r = mu + b_u + b_i + p_u . q_i) fit with Adam and weight decay, early-stopped on valid MSE.
Plain torch, full-batch (a few thousand ratings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger("recllm.loid")


class BiasedMF(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int, mean: float):
        super().__init__()
        self.mean = mean
        self.user_bias, self.item_bias = nn.Embedding(num_users, 1), nn.Embedding(num_items, 1)
        self.user, self.item = nn.Embedding(num_users, dim), nn.Embedding(num_items, dim)
        for emb in (self.user_bias, self.item_bias):
            nn.init.zeros_(emb.weight)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user(users) * self.item(items)).sum(-1)
        return self.mean + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + dot


@dataclass
class MFResult:
    model: BiasedMF
    best_epoch: int
    valid_mse: float
    dim: int
    weight_decay: float


def fit_mf(train: tuple[np.ndarray, np.ndarray, np.ndarray], valid: tuple[np.ndarray, np.ndarray, np.ndarray],
           num_users: int, num_items: int, dim: int = 16, lr: float = 0.01, weight_decay: float = 1e-4,
           max_epochs: int = 500, patience: int = 20, seed: int = 0) -> MFResult:
    """Fit on (users, items, ratings) train arrays; keep the epoch with the lowest valid MSE."""
    torch.manual_seed(seed)
    u, i, r = (torch.as_tensor(a) for a in train)
    vu, vi, vr = (torch.as_tensor(a) for a in valid)
    model = BiasedMF(num_users, num_items, dim, float(r.float().mean()))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, waited = float("inf"), 0, None, 0
    for epoch in range(1, max_epochs + 1):
        opt.zero_grad()
        loss = ((model(u, i) - r.float()) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            valid_mse = float(((model(vu, vi) - vr.float()) ** 2).mean())
        if valid_mse < best - 1e-6:
            best, best_epoch, waited = valid_mse, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    log.info("MF: best valid MSE %.4f at epoch %d", best, best_epoch)
    return MFResult(model, best_epoch, best, dim, weight_decay)


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)) ** 2))
