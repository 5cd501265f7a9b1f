"""LoID batches: one domain's reviews (build-reviews output) tokenised once, then cut into batches that carry
the user/item IDs, ratings and the k-review histories of both sides (unique history reviews encoded once).
``ReviewFeed`` is the resumable batch source the shared training loop draws from. Pure torch; the Ray worker and
the evaluator both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from data_pipeline.samples.prompt_format import pad_token_id


def id_rows(table: pa.Table) -> tuple[int, int]:
    """(users, items): the rows of a domain's user and item ID embeddings, one per dense id up to the largest
    in its reviews (a table of the user_id and item_id columns is enough)."""
    return int(pc.max(table.column("user_id")).as_py()) + 1, int(pc.max(table.column("item_id")).as_py()) + 1


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
    sample_ids: list[int] = field(default_factory=list)
    """The reviews' row numbers in the domain table (what a worker records as the samples it trained on)."""

    @property
    def real_tokens(self) -> int:
        return int(self.review_mask.sum())

    @property
    def slots(self) -> int:
        return self.review_mask.numel()

    def to(self, device) -> "ReviewBatch":
        return replace(self, **{f: getattr(self, f).to(device) for f in ("user_ids", "item_ids", "ratings",
                                "review_tokens", "review_mask", "user_history", "item_history")})


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
        self.num_users, self.num_items = id_rows(table)

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
                           torch.as_tensor(self.ratings[rows]), tokens, mask, index(hist_u), index(hist_i),
                           [int(r) for r in rows])


class ReviewFeed:
    """One worker's batches of a domain's train reviews, epoch after epoch. Every rank draws the same seeded
    permutation of an epoch and takes its own stride of it; ``state_dict`` (epoch, position) resumes exactly."""

    def __init__(self, reviews: DomainReviews, rows: np.ndarray, batch_size: int, rank: int, world: int, seed: int):
        self.reviews, self.rows, self.batch_size = reviews, rows, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.per_epoch = len(rows) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{len(rows)} train reviews < batch size {batch_size} x {world} workers")
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    @property
    def epoch_done(self) -> bool:
        """True right after the last batch of an epoch."""
        return self.position == self.per_epoch

    def next_batch(self) -> ReviewBatch:
        if self.epoch_done:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)
        lo = (self.position * self.world + self.rank) * self.batch_size
        self.position += 1
        return self.reviews.batch(self._order[lo: lo + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world:
            raise ValueError(f"loader state of {state['world']} workers cannot resume on {self.world}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
