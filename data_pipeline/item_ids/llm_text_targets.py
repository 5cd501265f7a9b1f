"""Targets of the semantic scheme's LLM-alignment loss: for each item, the mean of the chosen LM's input
embedding rows over the tokens of its title + description. Computed once before the quantiser trains, by a
``TextEmbedder`` the caller passes in (the run's LM: ``trainers.lm_text_embedder``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

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

