"""CLLM4Rec's losses on packed rows: next-token cross-entropy where some tasks predict with a softmax over a
subset of the vocabulary (item tokens only for the collaborative LM and the multinomial item head, the
original vocabulary for the content LM), and the mutual regularization that ties each collaborative token
row to its content twin. Pure torch; the CLLM4Rec objective calls them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ranking.code_trie import CodeTrie
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
                       sequence_task: int | None, group_of: torch.Tensor, groups: list[torch.Tensor],
                       trie: CodeTrie | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The sequence-level loss on logits gathered at labelled positions (pred [N, V], target [N]): a label of
    ``sequence_task`` is scored by a softmax over its own group's tokens, and not scored when it is in no group
    (unless there are no groups at all); every other label by the full vocabulary. With a ``trie`` of the items'
    code tokens, a code label is scored by a softmax over the children of its item's prefix instead (the exact
    item log-likelihood under the constrained decoder, a hierarchical softmax over the trie); a code whose
    prefix is not in the batch (a sequence cut mid-item) keeps its level's softmax. Returns (mean over scored
    labels, [num_tasks, 2] per-task loss sums and counts)."""
    if trie is not None and sequence_task is not None and groups:
        level = torch.where(tasks == sequence_task, group_of.to(target.device)[target], -1)
        node = trie_nodes(target, level, trie)
        on_trie = node >= 0
        if on_trie.any():
            nll = trie_child_nll(pred[on_trie], target[on_trie], level[on_trie], node[on_trie], trie)
            rest = ~on_trie
            rest_loss, per_task = grouped_token_loss(pred[rest], target[rest], tasks[rest], num_tasks, sequence_task,
                                                     group_of, groups)
            counted = per_task[:, 1].sum()
            per_task[sequence_task] += [float(nll.detach().sum()), nll.numel()]
            return (rest_loss * counted + nll.sum()) / (counted + nll.numel()), per_task
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


def trie_nodes(target: torch.Tensor, level: torch.Tensor, trie: CodeTrie) -> torch.Tensor:
    """[N] the trie node whose child each labelled position predicts (0, the root, at code level 0), or -1.
    ``level`` [N] is each label's code level (-1: not a code of the sequence task). A label at level d continues
    the d labels before it, its item's earlier codes, which a sample keeps contiguous; -1 where those are not a
    prefix in the trie (a sequence cut mid-item)."""
    node = torch.where(level == 0, 0, -1)
    for depth in range(1, trie.depth):
        here = torch.nonzero(level == depth).squeeze(-1)
        here = here[here > 0]
        before = here - 1
        parent = node[before]
        key = parent.clamp(min=0) * trie.vocab_size + target[before]
        keys = trie.edge_keys[depth - 1].to(target.device)
        found = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
        ok = (level[before] == depth - 1) & (parent >= 0) & (keys[found] == key)
        node[here] = torch.where(ok, found, torch.full_like(found, -1))
    return node


def trie_child_nll(pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor, node: torch.Tensor,
                   trie: CodeTrie) -> torch.Tensor:
    """[M] -log p(target | its trie node): each label's logit against a softmax over its node's children only
    (a node with one child scores exactly 0: nothing to learn there). pred [M, V] logits at the labels."""
    nll = pred.new_zeros(len(target), dtype=torch.float32)
    for depth in range(trie.depth):
        sel = torch.nonzero(level == depth).squeeze(-1)
        if not len(sel):
            continue
        offsets = trie.offsets[depth].to(target.device)
        start = offsets[node[sel]]
        count = offsets[node[sel] + 1] - start
        rank = torch.arange(int(count.max()), device=target.device)
        has = rank < count.unsqueeze(1)
        children = trie.edge_tokens[depth].to(target.device)[torch.where(has, start.unsqueeze(1) + rank, 0)]
        logits = pred[sel].float()
        child_logits = logits.gather(1, children).masked_fill(~has, -torch.inf)
        chosen = logits.gather(1, target[sel].unsqueeze(1)).squeeze(1)
        nll[sel] = torch.logsumexp(child_logits, dim=1) - chosen
    return nll
