"""CLLM4Rec's multinomial item head as a scorer: one forward pass over the prompt, a softmax restricted to the
item tokens at the answer position, top-K (optionally never an item the user already has). Atomic IDs only:
each item is one token.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def multinomial_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_token_ids: torch.Tensor,
                     top_k: int, seen: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(item indices [B, K] into ``item_token_ids``, log-probabilities [B, K]) from left-padded prompts."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                logits_to_keep=1)
    logits = out.logits[:, -1, :].float().index_select(-1, item_token_ids.to(input_ids.device))
    log_probs = torch.log_softmax(logits, dim=-1)
    if seen is not None:
        for row, items in enumerate(seen):
            if items:
                log_probs[row, torch.as_tensor(items, device=log_probs.device)] = float("-inf")
    k = min(top_k, log_probs.shape[-1])
    scores, idx = log_probs.topk(k, dim=-1)
    return idx, scores
