"""LoID batches: one domain's reviews (build-reviews output) tokenised once, then cut into batches that carry
the user/item IDs, ratings and the k-review histories of both sides (unique history reviews encoded once).
Pure torch; the Ray worker and the evaluator both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from data_pipeline.samples.prompt_format import pad_token_id


@dataclass
class ReviewBatch:
    user_ids: torch.Tensor
    """[B] dense user ids."""
    item_ids: torch.Tensor
    """[B] dense item ids."""
    ratings: torch.Tensor
    """[B] true ratings (float)."""
    review_tokens: torch.Tensor
    """[U, T] token ids of the unique history reviews in the batch (padded)."""
    review_mask: torch.Tensor
    """[U, T] True on real tokens."""
    user_history: torch.Tensor
    """[B, K] rows of review_tokens holding the user's past reviews, -1 where fewer than K."""
    item_history: torch.Tensor
    """[B, K] rows of review_tokens holding the item's past reviews, -1 where fewer than K."""


class DomainReviews:
    """All reviews of one domain, with token ids of each review text (cut to ``review_tokens``)."""

    def __init__(self, table: pa.Table, tokenizer, review_tokens: int, k: int):
        cols = table.to_pydict()
        self.user_ids = np.asarray(cols["user_id"], dtype=np.int64)
        self.item_ids = np.asarray(cols["item_id"], dtype=np.int64)
        self.ratings = np.asarray(cols["rating"], dtype=np.float32)
        self.split = np.asarray(cols["split"])
        self.k = k
        self.user_history = cols["user_history"]
        self.item_history = cols["item_history"]
        texts = [t or "" for t in cols["text"]]
        self.tokens = [ids[:review_tokens] or [tokenizer.eos_token_id]
                       for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.pad_id = pad_token_id(tokenizer)
        self.num_users = int(self.user_ids.max()) + 1
        self.num_items = int(self.item_ids.max()) + 1

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]

    def batch(self, rows: np.ndarray) -> ReviewBatch:
        hist_u = [self.user_history[r][: self.k] for r in rows]
        hist_i = [self.item_history[r][: self.k] for r in rows]
        unique = sorted({int(x) for h in hist_u + hist_i for x in h})
        where = {rid: n for n, rid in enumerate(unique)}
        width = max([len(self.tokens[r]) for r in unique], default=1)
        tokens = torch.full((max(len(unique), 1), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[0, 0] = True  # a batch with no history at all still encodes one (unused) row
        for n, rid in enumerate(unique):
            ids = self.tokens[rid]
            tokens[n, : len(ids)] = torch.tensor(ids)
            mask[n, : len(ids)] = True

        def index(hists):
            out = torch.full((len(rows), self.k), -1, dtype=torch.long)
            for b, h in enumerate(hists):
                out[b, : len(h)] = torch.tensor([where[int(x)] for x in h], dtype=torch.long)
            return out

        return ReviewBatch(torch.as_tensor(self.user_ids[rows]), torch.as_tensor(self.item_ids[rows]),
                           torch.as_tensor(self.ratings[rows]), tokens, mask, index(hist_u), index(hist_i))
