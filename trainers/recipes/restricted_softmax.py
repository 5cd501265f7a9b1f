"""CLLM4Rec's losses on packed rows: next-token cross-entropy where some tasks predict with a softmax over a
subset of the vocabulary (item tokens only for the collaborative LM and the multinomial item head, the
original vocabulary for the content LM), and the mutual regularization that ties each collaborative token
row to its content twin. Pure torch; the CLLM4Rec objective calls them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.packing import IGNORE


def vocabulary_lookup(allowed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] map token id -> index in ``allowed`` (-1 where the token is not allowed)."""
    lut = torch.full((vocab_size,), -1, dtype=torch.long)
    lut[allowed.long()] = torch.arange(len(allowed))
    return lut


def labelled_positions(labels: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """(flat indices into [B * (L - 1)] of the positions that predict a label, their targets, their tasks)."""
    target = labels[:, 1:].reshape(-1)
    index = torch.nonzero(target != IGNORE).squeeze(-1)
    return index, target[index], task_ids[:, 1:].reshape(-1)[index]


def restricted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                       restrictions: dict[int, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """(mean loss over scored tokens, [num_tasks, 2] per-task loss sums and token counts) from [B, L, V] logits.

    ``restrictions[task]`` is a sorted tensor of allowed token ids: that task's labelled tokens are scored by
    a softmax over those ids only, and its labels outside them (such as the EOS closing an item-only text)
    are not scored. Other tasks use the full vocabulary, as ``packed_lm_loss`` does.
    """
    index, target, tasks = labelled_positions(labels, task_ids)
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1])[index]
    return restricted_token_loss(pred, target, tasks, num_tasks, restrictions)


def restricted_token_loss(pred: torch.Tensor, target: torch.Tensor, tasks: torch.Tensor, num_tasks: int,
                          restrictions: dict[int, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """``restricted_lm_loss`` on logits already gathered at the labelled positions: pred [N, V], target [N]."""
    vocab = pred.shape[-1]
    losses, loss_tasks = [], []
    unrestricted = torch.ones_like(target, dtype=torch.bool)
    for task, allowed in restrictions.items():
        sel = tasks == task
        unrestricted &= ~sel
        if not sel.any():
            continue
        lut = vocabulary_lookup(allowed, vocab).to(target.device)
        sub_target = lut[target[sel]]
        keep = sub_target >= 0
        sub_pred = pred[sel][keep].index_select(-1, allowed.to(pred.device)).float()
        losses.append(F.cross_entropy(sub_pred, sub_target[keep], reduction="none"))
        loss_tasks.append(tasks[sel][keep])
    if unrestricted.any():
        losses.append(F.cross_entropy(pred[unrestricted].float(), target[unrestricted], reduction="none"))
        loss_tasks.append(tasks[unrestricted])
    token_loss = torch.cat(losses) if losses else pred.sum(-1)[:0]
    per_task = np.zeros((num_tasks, 2))
    if token_loss.numel() == 0:
        return pred.sum() * 0.0, per_task
    token_tasks = torch.cat(loss_tasks)
    with torch.no_grad():
        sums = torch.zeros(num_tasks, device=token_loss.device).index_add_(0, token_tasks, token_loss.detach())
        per_task[:, 0] = sums.cpu().numpy()
        per_task[:, 1] = torch.bincount(token_tasks, minlength=num_tasks).cpu().numpy()
    return token_loss.mean(), per_task


def mutual_regularization(embedding: torch.nn.Module, input_ids: torch.Tensor, partner: torch.Tensor,
                          weight: float) -> torch.Tensor:
    """weight/2 * mean over the ID pairs present in ``input_ids`` of ||e(collaborative) - e(content)||^2.

    ``partner[token]`` is the twin of a collaborative token (-1 for every other token); the pair enters once
    whichever of the two the batch mentions. Calling the embedding module (not reading its weight) keeps it
    correct when ZeRO-3 partitions the table.
    """
    present = torch.unique(input_ids)
    partner = partner.to(present.device)
    twin_of_content = torch.full_like(partner, -1)
    has = partner >= 0
    twin_of_content[partner[has]] = torch.nonzero(has).squeeze(-1)
    collab = torch.unique(torch.cat([present[partner[present] >= 0], twin_of_content[present][
        twin_of_content[present] >= 0]]))
    if collab.numel() == 0:
        return torch.zeros((), device=input_ids.device)
    rows = embedding(torch.cat([collab, partner[collab]]).unsqueeze(0)).squeeze(0).float()
    c, t = rows[:len(collab)], rows[len(collab):]
    return 0.5 * weight * (c - t).pow(2).sum(-1).mean()
