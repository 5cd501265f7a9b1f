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


def token_groups(tokenizer, token_seqs: list[list[str]], vocab_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ID groups of a vocabulary: group j holds the tokens at position j of the items' codes (semantic IDs:
    one group per code level; atomic IDs: one group, every item token). Returns ([vocab_size] token -> group,
    -1 for tokens of no group; the sorted token ids of each group). Sub-token IDs (no ``token_seqs``): no group."""
    group_of = torch.full((vocab_size,), -1, dtype=torch.long)
    members: list[set[int]] = []
    for tokens in token_seqs:
        for level, tid in enumerate(tokenizer.convert_tokens_to_ids(list(tokens))):
            if group_of[tid] >= 0:
                continue  # a token shared by two levels stays in the first (the schemes here never share)
            while len(members) <= level:
                members.append(set())
            members[level].add(tid)
            group_of[tid] = level
    groups = [torch.tensor(sorted(m), dtype=torch.long) for m in members]
    return group_of, groups


def grouped_token_loss(pred: torch.Tensor, target: torch.Tensor, tasks: torch.Tensor, num_tasks: int,
                       sequence_task: int | None, group_of: torch.Tensor,
                       groups: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """The sequence-level loss on logits gathered at labelled positions (pred [N, V], target [N]): a label of
    ``sequence_task`` is scored by a softmax over its own group's tokens, and not scored when it is in no group
    (unless there are no groups at all); every other label by the full vocabulary. Returns (mean over scored
    labels, [num_tasks, 2] per-task loss sums and counts)."""
    restrictions: dict[int, torch.Tensor] = {}
    if sequence_task is not None and groups:
        in_sequence = tasks == sequence_task
        target_group = group_of.to(target.device)[target]
        # One pseudo-task per group: restricted_token_loss then scores each with that group's softmax.
        tasks = torch.where(in_sequence, num_tasks + target_group.clamp(min=0), tasks)
        tasks = torch.where(in_sequence & (target_group < 0), num_tasks + len(groups), tasks)
        restrictions = {num_tasks + g: ids for g, ids in enumerate(groups)}
        restrictions[num_tasks + len(groups)] = torch.empty(0, dtype=torch.long)  # labels in no group: dropped
    loss, per_task = restricted_token_loss(pred, target, tasks, num_tasks + len(groups) + 1, restrictions)
    out = per_task[:num_tasks].copy()
    if sequence_task is not None:
        out[sequence_task] += per_task[num_tasks:].sum(0)
    return loss, out
