"""Targets of the semantic scheme's LLM-alignment loss: for each item, the mean of the chosen LM's input
embedding rows over the tokens of its title + description. Computed once before the quantiser trains.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

log = logging.getLogger("recllm.item_ids")

TextEmbedder = Callable[[list[str]], np.ndarray]
"""Texts -> [len(texts), T] float32 targets."""


def item_texts(items: pa.Table) -> list[str | None]:
    """title + description per item; None when the item has neither."""
    texts = []
    for title, description in zip(items.column("title").to_pylist(), items.column("description").to_pylist()):
        parts = [p.strip() for p in (title, description) if p and p.strip()]
        texts.append(" ".join(parts) if parts else None)
    return texts


def mean_input_embeddings(texts: list[str], embedding_table: torch.Tensor, tokenizer, max_tokens: int) -> np.ndarray:
    """Mean of ``embedding_table`` rows over each text's token ids (no special tokens, first ``max_tokens``)."""
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    token_ids = [ids[:max_tokens] for ids in token_ids]
    lengths = torch.tensor([len(ids) for ids in token_ids])
    if (lengths == 0).any():
        raise ValueError(f"text {texts[int((lengths == 0).nonzero()[0])]!r} has no tokens")
    flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    with torch.no_grad():
        means = F.embedding_bag(flat, embedding_table.detach().float(), offsets, mode="mean")
    return means.numpy()


class TextTargetsUnavailable(Exception):
    """The chosen LM cannot give text targets (no tokenizer, or shapes-only weights); alignment is skipped."""


def lm_text_embedder(model_cfg, max_tokens: int) -> TextEmbedder:
    """The default embedder: the LM the run fine-tunes, as built by trainers.models (no new tokens)."""

    def embed(texts: list[str]) -> np.ndarray:
        from trainers.models import build_model

        model, tokenizer = build_model(model_cfg)
        table = model.get_input_embeddings().weight
        if tokenizer is None or table.is_meta:
            raise TextTargetsUnavailable(f"model {model_cfg.size} is built without weights or tokenizer "
                                         "(meta init); give model.checkpoint")
        log.info("LLM-alignment targets from %s input embeddings %s", model_cfg.size, tuple(table.shape))
        return mean_input_embeddings(texts, table, tokenizer, max_tokens)

    return embed
