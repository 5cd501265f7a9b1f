"""The sequence objective's optional flat item softmax beside the code softmaxes (``train.sequence.item_loss``,
semantic IDs): where a labelled position predicts an item's first code, every item is scored by the hidden
state times the sum of its code rows, and the cross-entropy against the item whose codes follow is added.

No new parameters: an item's vector is built from the code rows the model already has, so nothing changes in
what is saved or how beam search reads the model. ``SequenceObjective`` (objectives.py) calls it; pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ItemCodeIndex:
    """The catalogue's code token ids ([items, levels]) and a lookup from a full code tuple to its item row."""

    code_ids: torch.Tensor
    """[items, levels] token ids of each item's codes, in item_codes row order."""
    rank_of: torch.Tensor
    """[vocab] a code token's index inside its level's group (-1: not a code)."""
    sorted_keys: torch.Tensor
    """The items' code tuples, each packed into one int64 (mixed radix over the levels' group sizes), sorted."""
    row_of_key: torch.Tensor
    """item row of each sorted key."""
    radix: int

    @classmethod
    def build(cls, code_ids: torch.Tensor, groups: list[torch.Tensor], vocab_size: int) -> "ItemCodeIndex":
        rank_of = torch.full((vocab_size,), -1, dtype=torch.long)
        for ids in groups:
            rank_of[ids] = torch.arange(len(ids))
        radix = max(len(g) for g in groups)
        keys = _pack(rank_of[code_ids], radix)
        order = torch.argsort(keys)
        return cls(code_ids, rank_of, keys[order], order, radix)

    def rows(self, code_tuples: torch.Tensor) -> torch.Tensor:
        """[N] item row of each [N, levels] tuple of code token ids (-1 where no item has those codes)."""
        keys = _pack(self.rank_of.to(code_tuples.device)[code_tuples], self.radix)
        sorted_keys = self.sorted_keys.to(keys.device)
        at = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
        return torch.where(sorted_keys[at] == keys, self.row_of_key.to(keys.device)[at], -1)


def _pack(ranks: torch.Tensor, radix: int) -> torch.Tensor:
    weights = radix ** torch.arange(ranks.shape[-1], device=ranks.device, dtype=torch.long)
    return torch.where((ranks < 0).any(-1), -1, (ranks * weights).sum(-1))


def item_starts(index: torch.Tensor, target: torch.Tensor, level: torch.Tensor,
                items: ItemCodeIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the labelled list that predict a whole item's first code, that item's row).

    ``index`` [N] are the labels' flat positions, ``target`` their token ids and ``level`` their code level (-1:
    not an item code). A start counts only when the next ``levels - 1`` labels are that item's remaining codes at
    consecutive positions, so an item cut by a packed row's end is left out."""
    depth = items.code_ids.shape[1]
    n = len(target)
    starts = torch.nonzero(level[: max(n - depth + 1, 0)] == 0).squeeze(-1)
    if len(starts) == 0:
        return starts, starts
    span = starts[:, None] + torch.arange(depth, device=starts.device)
    whole = ((index[span] - index[starts][:, None]) == torch.arange(depth, device=starts.device)).all(-1)
    whole &= (level[span] == torch.arange(depth, device=starts.device)).all(-1)
    starts, span = starts[whole], span[whole]
    rows = items.rows(target[span])
    known = rows >= 0
    return starts[known], rows[known]


def item_level_loss(hidden: torch.Tensor, rows: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each state's next item ([N, H] states, [N] item rows) over every item, whose
    logit is the state times the item's vector ([items, H], the sum of its code rows)."""
    logits = hidden.float() @ item_vectors.float().T
    return F.cross_entropy(logits, rows)
