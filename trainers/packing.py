"""Tokenised samples -> packed rows of fixed length, for the SFT trainer.

A sample is prompt tokens + response tokens + EOS; only response tokens (and EOS) carry labels. Rows
hold several samples; ``position_ids`` restart at 0 for each sample, which makes Hugging Face LLaMA build
a block-diagonal causal mask (SDPA) or use variable-length kernels (flash-attn), so packed samples never
attend to each other. The packer is deterministic and its pending queue is part of the loader state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from data_pipeline.samples.prompt_format import format_for_task

IGNORE = -100


@dataclass
class TokenizedSample:
    sample_id: int
    task: int
    input_ids: list[int]
    prompt_len: int
    entities: list[int] | None = None
    """Per token, the item/user it names (ControlRec's visibility matrix; see recipes.visibility), else None."""

    def to_json(self) -> list:
        row = [self.sample_id, self.task, self.input_ids, self.prompt_len]
        return row + [self.entities] if self.entities is not None else row

    @classmethod
    def from_json(cls, row: list) -> "TokenizedSample":
        entities = list(map(int, row[4])) if len(row) > 4 and row[4] is not None else None
        return cls(int(row[0]), int(row[1]), list(map(int, row[2])), int(row[3]), entities)


def tokenize_sample(tokenizer, prompt: str, response: str, seq_len: int, task: str = "") -> tuple[list[int], int]:
    """(input_ids, prompt_len) in the format of ``task`` (see data_pipeline.samples.prompt_format)."""
    return format_for_task(task).sample_ids(tokenizer, prompt, response, seq_len)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    task_ids: torch.Tensor
    """Per label position: the task of the token (-1 where there is no label)."""
    sample_ids: list[int]
    real_tokens: int
    entity_ids: torch.Tensor | None = None
    """Per position, the entity key of the token (0 for text and padding), when the samples carry them."""

    @property
    def slots(self) -> int:
        """Token positions in the batch, padding included."""
        return self.input_ids.numel()

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.input_ids.numel()


class Packer:
    """Fills [rows, seq_len] from a stream of samples, first-fit over a look-ahead window."""

    def __init__(self, seq_len: int, rows: int, pad_id: int, lookahead: int = 64, packing: bool = True):
        self.seq_len, self.rows, self.pad_id = seq_len, rows, pad_id
        self.lookahead, self.packing = lookahead, packing
        self.pending: deque[TokenizedSample] = deque()

    def state_dict(self) -> dict:
        return {"pending": [s.to_json() for s in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.pending = deque(TokenizedSample.from_json(r) for r in state["pending"])

    def need(self) -> int:
        """How many more samples the packer wants before building a batch."""
        want = self.rows * (self.lookahead if self.packing else 1)
        return max(0, want - len(self.pending))

    def add(self, samples: Iterable[TokenizedSample]) -> None:
        self.pending.extend(samples)

    def build(self) -> PackedBatch | None:
        if not self.pending:
            return None
        rows: list[list[TokenizedSample]] = []
        for _ in range(self.rows):
            if not self.pending:
                break
            row, free = [], self.seq_len
            if not self.packing:
                row.append(self.pending.popleft())
            else:
                i = 0
                while i < min(len(self.pending), self.lookahead) and free > 0:
                    s = self.pending[i]
                    if len(s.input_ids) <= free:
                        row.append(s)
                        free -= len(s.input_ids)
                        del self.pending[i]
                    else:
                        i += 1
                if not row:  # longer than a row: cannot happen after tokenize_sample, but never loop forever
                    row.append(self.pending.popleft())
            rows.append(row)
        return self._tensors(rows)

    def _tensors(self, rows: list[list[TokenizedSample]]) -> PackedBatch:
        n, L = self.rows, self.seq_len
        input_ids = np.full((n, L), self.pad_id, dtype=np.int64)
        labels = np.full((n, L), IGNORE, dtype=np.int64)
        task_ids = np.full((n, L), -1, dtype=np.int64)
        position_ids = np.zeros((n, L), dtype=np.int64)
        with_entities = any(s.entities is not None for row in rows for s in row)
        entity_ids = np.zeros((n, L), dtype=np.int64) if with_entities else None
        sample_ids, real = [], 0
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                ids = s.input_ids[:L - at]
                k = len(ids)
                input_ids[r, at:at + k] = ids
                position_ids[r, at:at + k] = np.arange(k)
                # labels[t] is the token at t; the model shifts them, so mark response positions.
                labels[r, at + s.prompt_len:at + k] = ids[s.prompt_len:]
                task_ids[r, at + s.prompt_len:at + k] = s.task
                if entity_ids is not None and s.entities is not None:
                    entity_ids[r, at:at + k] = s.entities[:k]
                sample_ids.append(s.sample_id)
                at += k
                real += k
            # Padding is its own "sample" (positions restart) so it never attends into real tokens.
            position_ids[r, at:] = np.arange(L - at)
        return PackedBatch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(position_ids),
                           torch.from_numpy(task_ids), sample_ids, real,
                           torch.from_numpy(entity_ids) if entity_ids is not None else None)
