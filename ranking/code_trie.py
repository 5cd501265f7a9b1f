"""Prefix trie over every valid item code sequence (from item_ids/), held as tensors for constrained beam search.

Depth d numbers the distinct length-d prefixes in sorted order. Per depth: CSR edges sorted by (parent, token),
an edge's row being the id of the child it leads to; a dense [nodes, vocab] allowed-next mask where it fits a
memory limit; the item ending at each node. Lookups are batched: one searchsorted and one gather per step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DENSE_MASK_LIMIT = 1 << 26
"""Largest nodes x vocab of one depth whose allowed-next mask is precomputed (bytes); beyond it, masks are
scattered from the CSR edges on each call."""


def _padded(sequences, end_token: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sequences (ragged lists or an [N, L] array) -> (tokens [N, D] padded with -1, lengths [N])."""
    if isinstance(sequences, (np.ndarray, torch.Tensor)) and sequences.ndim == 2:
        tokens = np.asarray(sequences, dtype=np.int64)
        lengths = np.full(len(tokens), tokens.shape[1], dtype=np.int64)
    else:
        rows = [list(map(int, s)) for s in sequences]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        tokens = np.full((len(rows), int(lengths.max()) if len(rows) else 0), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
    if end_token is not None:
        if (tokens == end_token).any():
            raise ValueError(f"end_token {end_token} also occurs inside a code sequence")
        tokens = np.concatenate([tokens, np.full((len(tokens), 1), -1, dtype=np.int64)], axis=1)
        tokens[np.arange(len(tokens)), lengths] = end_token
        lengths = lengths + 1
    return tokens, lengths


class CodeTrie:
    def __init__(self, sequences: Sequence[Sequence[int]] | np.ndarray | torch.Tensor, items: Sequence[int] | None = None,
                 vocab_size: int | None = None, end_token: int | None = None, dense_mask_limit: int = DENSE_MASK_LIMIT):
        """``sequences``: one code sequence per item (lengths may differ); ``items``: their item ids (default
        0..N-1). ``end_token`` is appended to every sequence, which makes the set prefix-free (needed when one
        item's sequence is a prefix of another's, as with subtoken IDs). Two items with the same sequence
        are an error.
        """
        tokens, lengths = _padded(sequences, end_token)
        n, depth = tokens.shape
        self.items = np.arange(n, dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
        if len(self.items) != n:
            raise ValueError(f"{len(self.items)} items for {n} sequences")
        if n and lengths.min() == 0:
            raise ValueError(f"item {int(self.items[lengths.argmin()])} has an empty code sequence")
        if (tokens[np.arange(depth) < lengths[:, None]] < 0).any():
            raise ValueError("code tokens must be >= 0")
        largest = int(tokens.max()) if tokens.size else -1
        self.vocab_size = vocab_size if vocab_size is not None else largest + 1
        if largest >= self.vocab_size:
            raise ValueError(f"token {largest} is outside vocab_size {self.vocab_size}")
        self.end_token = end_token
        self.edge_keys: list[torch.Tensor] = []
        """Per depth d: sorted parent * vocab + token of every edge d -> d+1; its row is the child's id."""
        self.edge_tokens: list[torch.Tensor] = []
        self.offsets: list[torch.Tensor] = []
        """Per depth d: CSR offsets [nodes_d + 1] of each node's edges."""
        self.terminal_items: list[torch.Tensor] = []
        """Per depth d: the item whose sequence ends at each node of depth d, or -1."""
        self.masks: list[torch.Tensor | None] = []
        node = np.zeros(n, dtype=np.int64)
        num_nodes = 1
        self.terminal_items.append(torch.full((1,), -1, dtype=torch.long))
        for d in range(depth):
            active = lengths > d
            keys = node[active] * self.vocab_size + tokens[active, d]
            edge_keys, child = np.unique(keys, return_inverse=True)
            parents = edge_keys // self.vocab_size
            self.edge_keys.append(torch.from_numpy(edge_keys))
            self.edge_tokens.append(torch.from_numpy(edge_keys % self.vocab_size))
            self.offsets.append(torch.from_numpy(np.searchsorted(parents, np.arange(num_nodes + 1))))
            node[active] = child
            num_nodes = len(edge_keys)
            ends = np.flatnonzero(lengths == d + 1)
            terminal = np.full(num_nodes, -1, dtype=np.int64)
            ended_nodes = node[ends]
            shared = np.flatnonzero(np.bincount(ended_nodes, minlength=num_nodes) > 1)
            if len(shared):
                owners = ends[ended_nodes == shared[0]]
                raise ValueError(f"items {self.items[owners].tolist()} share the code sequence "
                                 f"{tokens[owners[0], :d + 1].tolist()}")
            terminal[ended_nodes] = self.items[ends]
            self.terminal_items.append(torch.from_numpy(terminal))
        for d in range(depth):
            parents_count = len(self.offsets[d]) - 1
            if parents_count * self.vocab_size <= dense_mask_limit:
                self.masks.append(self._scatter_mask(d, torch.arange(parents_count)))
            else:
                self.masks.append(None)

    @classmethod
    def from_item_ids(cls, item_ids_dir: str, vocab_size: int | None = None, end_token: int | None = None,
                      **kwargs) -> "CodeTrie":
        """The trie of an item_ids/ folder's item_codes.parquet (codes in the scheme's own numbering)."""
        import json

        from data_pipeline import storage
        from data_pipeline.item_ids.item_codes import code_matrix
        from data_pipeline.run_layout import STATS_FILE, read_item_codes

        table = read_item_codes(item_ids_dir)
        if vocab_size is None:
            stats = json.loads(storage.read_text(storage.join(item_ids_dir, STATS_FILE)))
            vocab_size = stats.get("codes")  # semantic, precomputed: codes per level; else the largest code + 1
        try:
            codes = code_matrix(table)
        except ValueError:  # subtoken codes vary in length
            codes = table.column("codes").to_pylist()
        return cls(codes, table.column("item_id").to_numpy(), vocab_size, end_token, **kwargs)

    @property
    def depth(self) -> int:
        """Length of the longest sequence (with the end token)."""
        return len(self.edge_keys)

    def num_nodes(self, depth: int) -> int:
        return len(self.terminal_items[depth])

    def step(self, depth: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Children (ids at depth+1) of ``nodes`` (ids at ``depth``) along ``tokens``; -1 where there is none."""
        nodes = torch.as_tensor(nodes, dtype=torch.long)
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if depth >= self.depth:
            return torch.full_like(nodes, -1)
        keys = self.edge_keys[depth]
        ok = (nodes >= 0) & (tokens >= 0) & (tokens < self.vocab_size)
        if len(keys) == 0:
            return torch.full_like(nodes, -1)
        query = torch.where(ok, nodes * self.vocab_size + tokens, torch.zeros_like(nodes))
        pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        return torch.where(ok & (keys[pos] == query), pos, torch.full_like(pos, -1))

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node ids [B] at depth P of ``prefixes`` [B, P]; -1 for a prefix no item has."""
        prefixes = torch.as_tensor(prefixes, dtype=torch.long)
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long)
        for d in range(prefixes.shape[1]):
            nodes = self.step(d, nodes, prefixes[:, d])
        return nodes

    def _scatter_mask(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(len(nodes), self.vocab_size, dtype=torch.bool)
        valid = nodes >= 0
        safe = torch.where(valid, nodes, torch.zeros_like(nodes))
        starts = self.offsets[depth][safe]
        counts = torch.where(valid, self.offsets[depth][safe + 1] - starts, torch.zeros_like(starts))
        rows = torch.repeat_interleave(torch.arange(len(nodes)), counts)
        # Edge index of every (row, child): its row's start plus its rank inside the row.
        rank = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        mask[rows, self.edge_tokens[depth][torch.repeat_interleave(starts, counts) + rank]] = True
        return mask

    def allowed_next_from_nodes(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        """Bool [B, vocab]: tokens that extend node ``nodes`` (ids at ``depth``) toward some item."""
        nodes = torch.as_tensor(nodes, dtype=torch.long)
        if depth >= self.depth:
            return torch.zeros(len(nodes), self.vocab_size, dtype=torch.bool)
        dense = self.masks[depth]
        if dense is None:
            return self._scatter_mask(depth, nodes)
        rows = dense[nodes.clamp(min=0)]
        return rows & (nodes >= 0).unsqueeze(1)

    def allowed_next(self, prefixes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Bool [B, vocab] of allowed next tokens after each prefix of ``prefixes`` [B, P] (all of length P)."""
        prefixes = torch.as_tensor(prefixes, dtype=torch.long)
        if prefixes.dim() == 1:
            prefixes = prefixes.unsqueeze(0)
        return self.allowed_next_from_nodes(prefixes.shape[1], self.walk(prefixes))

    def item_of(self, code_seq):
        """Item id of a full code sequence (with the end token, if the trie has one), -1 if none.

        A 1-D sequence gives an int; [B, L] gives a LongTensor [B].
        """
        seqs = torch.as_tensor(code_seq, dtype=torch.long)
        single = seqs.dim() == 1
        seqs = seqs.unsqueeze(0) if single else seqs
        length = seqs.shape[1]
        if length > self.depth:
            out = torch.full((seqs.shape[0],), -1, dtype=torch.long)
        else:
            nodes = self.walk(seqs)
            out = torch.where(nodes >= 0, self.terminal_items[length][nodes.clamp(min=0)], torch.full_like(nodes, -1))
        return int(out[0]) if single else out

    def is_valid(self, code_seq):
        """Whether a full code sequence names an item: bool for a 1-D sequence, BoolTensor [B] for [B, L]."""
        items = self.item_of(code_seq)
        return items >= 0
