"""The SFT objective on packed rows: next-token cross-entropy on response tokens only, with per-task sums.

Pure torch; the trainer loop and the recipes call it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.packing import IGNORE


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                   num_tasks: int) -> tuple[torch.Tensor, np.ndarray]:
    """(mean loss over labelled tokens, [num_tasks, 2] array of per-task loss sums and token counts).

    ``labels[t]`` is the token at position t (or IGNORE); it is predicted from position t-1.
    """
    pred = logits[:, :-1, :].float()
    target = labels[:, 1:]
    tasks = task_ids[:, 1:]
    token_loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                 reduction="none")
    mask = target.reshape(-1) != IGNORE
    n = mask.sum().clamp(min=1)
    loss = token_loss.sum() / n
    with torch.no_grad():
        flat_tasks = tasks.reshape(-1)[mask]
        flat_loss = token_loss[mask].detach()
        per_task = np.zeros((num_tasks, 2))
        if flat_tasks.numel():
            sums = torch.zeros(num_tasks, device=flat_loss.device).index_add_(0, flat_tasks, flat_loss)
            counts = torch.bincount(flat_tasks, minlength=num_tasks)
            per_task[:, 0] = sums.cpu().numpy()
            per_task[:, 1] = counts.cpu().numpy()
    return loss, per_task
