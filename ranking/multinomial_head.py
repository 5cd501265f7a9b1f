"""CLLM4Rec's multinomial item head as a scorer: one forward pass over the prompt, a softmax restricted to the
item tokens at the answer position, top-K (optionally never an item the user already has). Atomic IDs only:
each item is one token.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def item_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                item_token_ids: torch.Tensor) -> torch.Tensor:
    """[B, items] float logits of the item tokens at the last position of left-padded prompts."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                logits_to_keep=1)
    return out.logits[:, -1, :].float().index_select(-1, item_token_ids.to(input_ids.device))


@torch.no_grad()
def multinomial_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_token_ids: torch.Tensor,
                     top_k: int, seen: list[list[int]] | None = None,
                     item_scores: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(item indices [B, K] into ``item_token_ids``, scores [B, K]) from left-padded prompts. Scores are
    log-probabilities, or ``item_scores(logits)`` when given (the text expert's)."""
    logits = item_logits(model, input_ids, attention_mask, item_token_ids)
    log_probs = item_scores(logits) if item_scores is not None else torch.log_softmax(logits, dim=-1)
    if seen is not None:
        for row, items in enumerate(seen):
            if items:
                log_probs[row, torch.as_tensor(items, device=log_probs.device)] = float("-inf")
    k = min(top_k, log_probs.shape[-1])
    scores, idx = log_probs.topk(k, dim=-1)
    return idx, scores
