"""LoRA through peft for the SFT trainer: adapters on the attention/MLP projections plus trainable rows for
the new item/user tokens (``trainable_token_indices``; tied heads stay tied, untied heads get their rows too).
"""

from __future__ import annotations

import logging
from typing import Sequence

from peft import LoraConfig, get_peft_model

log = logging.getLogger("recllm.train")


def apply_lora(model, new_token_ids: Sequence[int], r: int, alpha: int, dropout: float,
               target_modules: Sequence[str]):
    """Wrap ``model`` in a PeftModel; only LoRA weights and the new-token rows train."""
    token_targets = None
    if new_token_ids:
        ids = sorted(int(i) for i in new_token_ids)
        token_targets = {"embed_tokens": ids}
        if not model.config.tie_word_embeddings:
            token_targets["lm_head"] = ids
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        trainable_token_indices=token_targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s; %d new-token rows trainable; %s of %s parameters train", r, list(target_modules),
             len(new_token_ids), f"{trainable:,}", f"{total:,}")
    return peft_model
