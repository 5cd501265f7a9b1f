"""ControlRec's visibility matrix: inside a packed row, a token of one ID (an item or user named in the
text) may attend to a token of another ID only when the two are related in the training interaction graph
(the user interacted with the item; two items were interacted with by one user). Text tokens see and are seen
as usual. The result is an additive 4D mask (0 / dtype-min) that also keeps packed samples apart, which
Hugging Face LLaMA hands unchanged to SDPA (and eager). Flash-attention kernels take no arbitrary mask, so
the trainer runs this recipe with SDPA; ``visibility_mask_mod`` gives the same mask to FlexAttention (measured
in ``bench/gpu_suite.py``).

Entity keys: item i -> i + 1, user u -> -(u + 1), plain text -> 0.
"""

from __future__ import annotations

import re

import numpy as np
import torch

ENTITY_PATTERN = re.compile(r"<[a-z_]+_\d+>|\b(?:item|user)_\d+\b")
"""Candidate ID mentions: atomic tokens (<item_12>, <user_3>) and subtoken names (item_1471)."""


def item_key(item: int) -> int:
    return item + 1


def user_key(user: int) -> int:
    return -(user + 1)


class EntityIndex:
    """Maps the names a prompt uses for items/users (from item_ids/) to entity keys."""

    def __init__(self, item_names: list[str], user_names: list[str] | None = None):
        self.keys: dict[str, int] = {name: item_key(i) for i, name in enumerate(item_names)
                                     if ENTITY_PATTERN.fullmatch(name)}
        for u, name in enumerate(user_names or []):
            token = name.split()[-1]  # 'user <user_5>' -> '<user_5>'
            if ENTITY_PATTERN.fullmatch(token):
                self.keys[token] = user_key(u)

    def spans(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, key) of every known ID mention in ``text``, by character offsets."""
        return [(m.start(), m.end(), self.keys[m.group()]) for m in ENTITY_PATTERN.finditer(text)
                if m.group() in self.keys]


def token_entities(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    """Per token (character offsets), the key of the mention its first non-space character falls in, else 0."""
    out = [0] * len(offsets)
    j = 0
    for t, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and end > spans[j][0] and start < spans[j][1]:
            out[t] = spans[j][2]
    return out


class InteractionGraph:
    """Which entity pairs are related: user-item edges of the train sequences and item-item co-interactions."""

    def __init__(self, histories: list[list[int]], users: list[int], window: int = 0):
        keys = []
        for user, items in zip(users, histories):
            arr = np.fromiter((item_key(i) for i in dict.fromkeys(items)), np.int64)
            keys.append(self._keys(np.full(len(arr), user_key(user), np.int64), arr))
            a, b = np.triu_indices(len(arr), k=1)
            if window > 0:
                near = b - a <= window
                a, b = a[near], b[near]
            keys.append(self._keys(arr[a], arr[b]))
        self._pairs = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        self.num_edges = len(self._pairs)

    @staticmethod
    def _keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """One int64 per unordered pair of entity keys (|key| < 2**30)."""
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return ((lo + (1 << 30)) << 31) | (hi + (1 << 30))

    @staticmethod
    def _key(a: int, b: int) -> int:
        lo, hi = min(a, b), max(a, b)
        return ((lo + (1 << 30)) << 31) | (hi + (1 << 30))

    def related_pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``related`` for arrays of entity-key pairs at once."""
        keys = self._keys(np.asarray(a, np.int64), np.asarray(b, np.int64))
        i = np.minimum(np.searchsorted(self._pairs, keys), max(len(self._pairs) - 1, 0))
        found = self._pairs[i] == keys if len(self._pairs) else np.zeros(len(keys), bool)
        return found | (np.asarray(a) == np.asarray(b))

    def related(self, a: int, b: int) -> bool:
        if a == b:
            return True
        k = self._key(a, b)
        i = np.searchsorted(self._pairs, k)
        return bool(i < len(self._pairs) and self._pairs[i] == k)


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] index of each token's packed sample within its row (positions restart at 0 per sample)."""
    return (position_ids == 0).cumsum(-1)


def _entity_tables(entity_ids: torch.Tensor, graph: InteractionGraph,
                   table_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(local [B, L]: each token's ID numbered 1.. within its row, 0 for text; related [B, E + 1, E + 1], or
    [B, table_size, table_size]: whether two numbered IDs may see each other, text (0) seeing everything)."""
    local = torch.zeros_like(entity_ids)
    tables = []
    for r in range(entity_ids.shape[0]):
        keys = entity_ids[r]
        present = torch.unique(keys[keys != 0]).tolist()
        for n, k in enumerate(present, start=1):
            local[r][keys == k] = n
        table = np.ones((len(present) + 1, len(present) + 1), dtype=bool)
        i, j = np.triu_indices(len(present), k=1)
        table[i + 1, j + 1] = table[j + 1, i + 1] = graph.related_pairs(np.array(present)[i], np.array(present)[j])
        tables.append(torch.from_numpy(table))
    width = max(len(t) for t in tables)
    if table_size is not None:
        if table_size < width:
            raise ValueError(f"table_size {table_size} < {width} (IDs in the busiest row + 1)")
        width = table_size
    related = torch.ones(len(tables), width, width, dtype=torch.bool)
    for r, table in enumerate(tables):
        related[r, :len(table), :len(table)] = table
    return local, related.to(entity_ids.device)


def visibility_mask(position_ids: torch.Tensor, entity_ids: torch.Tensor, graph: InteractionGraph,
                    dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask: causal, within one packed sample (positions restart at 0), and between
    tokens of two different IDs only when ``graph`` relates them."""
    b, length = position_ids.shape
    segment = _segments(position_ids)
    local, related = _entity_tables(entity_ids, graph)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    rows = torch.arange(b, device=position_ids.device).view(b, 1, 1)
    allowed = (causal & (segment.unsqueeze(-1) == segment.unsqueeze(-2))
               & related[rows, local.unsqueeze(-1), local.unsqueeze(-2)])
    mask = torch.zeros(b, 1, length, length, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)


def visibility_mask_mod(position_ids: torch.Tensor, entity_ids: torch.Tensor, graph: InteractionGraph,
                        table_size: int | None = None):
    """The mask of ``visibility_mask`` as a FlexAttention ``mask_mod(b, h, q, kv) -> bool``, read from [B, L]
    tensors and the small relation table, never an L x L one: ``create_block_mask(mod, B, None, L, L)`` makes
    the block-sparse mask that lets fused kernels skip whole blocks. A fixed ``table_size`` (L + 1 always
    suffices) keeps the tensors' shapes the same from batch to batch, so a compiled kernel is not rebuilt."""
    segment = _segments(position_ids)
    local, related = _entity_tables(entity_ids, graph, table_size)

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (segment[b, q] == segment[b, kv]) & related[b, local[b, q], local[b, kv]]

    return mask_mod


def tokenize_with_entities(tokenizer, prompt: str, response: str, seq_len: int,
                           index: EntityIndex, task: str = "") -> tuple[list[int], int, list[int]]:
    """``packing.tokenize_sample`` plus the entity key of every token (same ids, same cuts, the format of
    ``task``: a user_sequence sample is unframed and keeps its most recent items)."""
    from data_pipeline.samples.prompt_format import fit_sample, format_for_task

    def encode(text: str) -> tuple[list[int], list[int]]:
        if not text:
            return [], []
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], token_entities(enc["offset_mapping"], index.spans(text))

    fmt = format_for_task(task)
    head = fmt.head(tokenizer)
    prompt_ids, prompt_ents = encode(fmt.frame(prompt))
    response_ids, response_ents = encode(response)
    response_ids = fmt.recent_response(response_ids, len(head), len(prompt_ids), seq_len)
    response_ents = fmt.recent_response(response_ents, len(head), len(prompt_ids), seq_len)
    ids, n_prompt = fit_sample(head, prompt_ids, response_ids, tokenizer.eos_token_id, seq_len)
    entities, _ = fit_sample([0] * len(head), prompt_ents, response_ents, 0, seq_len)
    return ids, n_prompt, entities
