"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item history. The model, its
full-ranking top-K and its checkpoint (safetensors weights + a JSON architecture); it is trained by
`recllm train-baseline` (``trainers.baseline``), whose item embeddings feed the semantic-ID quantiser and whose
model is the baseline of the evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline import storage
from trainers.sasrec_config import SASRecConfig

WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "sasrec.json"
ARCHITECTURE_FORMAT = "recllm.sasrec/1"
PAD = 0  # token 0 is padding; dense item_id i is token i + 1


@dataclass
class SASRecArchitecture:
    """What it takes to rebuild a SASRec: stored as JSON next to the safetensors weights."""

    num_items: int
    """Catalogue size; dense item_id i is embedding row i + 1 (row 0 is padding)."""
    hidden_size: int = 64
    """Embedding and block width."""
    num_blocks: int = 2
    """Causal self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block."""
    max_len: int = 50
    """Longest history read; also the number of learned positions."""
    dropout: float = 0.2
    """Dropout used in training."""


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + feed-forward(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        # The paper's point-wise feed-forward: two position-wise linear maps with a ReLU.
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_size, hidden_size))
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; allowed [B, 1, L, L], True where query i may attend to key j."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.num_heads, d // self.num_heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=allowed,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out_dropout(self.attn_out(attended.transpose(1, 2).reshape(b, length, d)))
        return x + self.out_dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Item embedding (shared for input and scoring) + learned positions + causal attention blocks.

    Histories are left-padded; positions count back from the most recent item, so the same history
    gives the same output whatever the padded width of its batch.
    """

    def __init__(self, num_items: int, hidden_size: int = 64, num_blocks: int = 2, num_heads: int = 1,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        self.arch = SASRecArchitecture(num_items, hidden_size, num_blocks, num_heads, max_len, dropout)
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalSelfAttentionBlock(hidden_size, num_heads, dropout)
                                    for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        nn.init.xavier_normal_(self.item_emb.weight)
        nn.init.xavier_normal_(self.pos_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    @classmethod
    def from_config(cls, num_items: int, cfg: SASRecConfig) -> "SASRec":
        return cls(num_items, cfg.hidden_size, cfg.num_blocks, cfg.num_heads, cfg.max_len, cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, W] (left-padded, W <= max_len) -> hidden states [B, W, d]; padded rows are zero."""
        b, width = tokens.shape
        if width > self.max_len:
            raise ValueError(f"sequence width {width} exceeds max_len {self.max_len}")
        is_item = tokens != PAD
        positions = torch.arange(self.max_len - width, self.max_len, device=tokens.device)
        x = self.item_emb(tokens) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        keep = is_item.unsqueeze(-1).to(x.dtype)
        x = self.emb_dropout(x) * keep
        causal = torch.ones(width, width, dtype=torch.bool, device=tokens.device).tril()
        # A query sees earlier real items and itself; a padded query seeing only itself avoids empty softmax rows.
        allowed = causal & (is_item.unsqueeze(1) | torch.eye(width, dtype=torch.bool, device=tokens.device))
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, hidden]: row i is dense item_id i (the padding row left out)."""
        return self.item_emb.weight[1:].detach().clone()

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Full-ranking scores [B, num_items] of the next item after each history (dense item ids).

        Runs in eval mode (no dropout) and restores the previous mode.
        """
        tokens = histories_to_tokens(histories, self.max_len, self.num_items).to(self.item_emb.weight.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                last = self(tokens)[:, -1]
                return last @ self.item_emb.weight[1:].T
        finally:
            self.train(was_training)


def histories_to_tokens(histories: Sequence[Sequence[int]], max_len: int, num_items: int) -> torch.Tensor:
    """Left-padded tokens [B, W] of the last ``max_len`` items of each history; W = longest kept length."""
    lengths = np.fromiter((min(len(h), max_len) for h in histories), dtype=np.int64, count=len(histories))
    width = max(1, int(lengths.max(initial=0)))
    flat = np.fromiter((item for h, n in zip(histories, lengths) for item in h[len(h) - n:]),
                       dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= num_items):
        bad = flat[(flat < 0) | (flat >= num_items)][0]
        raise ValueError(f"history item id {bad} outside the catalogue [0, {num_items})")
    rows = np.repeat(np.arange(len(histories)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = width - np.repeat(lengths, lengths) + (np.arange(flat.size) - starts)
    tokens = np.zeros((len(histories), width), dtype=np.int64)
    tokens[rows, cols] = flat + 1
    return torch.from_numpy(tokens)


# ---------------------------------------------------------------------------------------------
# Ranking


def recommend_topk(model: SASRec, histories: Sequence[Sequence[int]], k: int, exclude_seen: bool,
                   batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (item_ids [B, k], scores [B, k]) on CPU, best first; ``exclude_seen`` drops history items."""
    if not 0 < k <= model.num_items:
        raise ValueError(f"k={k} must be in [1, {model.num_items}]")
    ids = torch.zeros(len(histories), k, dtype=torch.long)
    scores = torch.zeros(len(histories), k)
    # Score similar lengths together so short histories are not padded to the longest one.
    order = np.argsort([min(len(h), model.max_len) for h in histories], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [histories[r] for r in rows]
        chunk_scores = model.score(chunk)
        if exclude_seen:
            seen_rows = [r for r, h in enumerate(chunk) for _ in h]
            seen_items = [item for h in chunk for item in h]
            chunk_scores[seen_rows, seen_items] = float("-inf")
        top = torch.topk(chunk_scores, k, dim=1)
        ids[torch.from_numpy(rows)] = top.indices.cpu()
        scores[torch.from_numpy(rows)] = top.values.cpu()
    return ids, scores


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a JSON architecture, never pickle


def checkpoint_files(model: SASRec) -> dict[str, bytes]:
    """{model.safetensors, sasrec.json}: the weights and what it takes to rebuild the model around them."""
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    arch = {"format": ARCHITECTURE_FORMAT, **asdict(model.arch)}
    return {WEIGHTS_FILE: safetensors.torch.save(weights), ARCHITECTURE_FILE: json.dumps(arch, indent=2).encode()}


def save_sasrec(model: SASRec, path_dir: str) -> None:
    """Write ``path_dir``/{model.safetensors, sasrec.json}; the folder appears complete or not at all."""
    with storage.staged_folder(path_dir) as staged:
        for name, data in checkpoint_files(model).items():
            staged.write_bytes(name, data)


def load_sasrec(path_dir: str, device: str = "cpu") -> SASRec:
    """The model saved by ``save_sasrec``, in eval mode on ``device``."""
    arch = json.loads(storage.read_text(storage.join(path_dir, ARCHITECTURE_FILE)))
    fmt = arch.pop("format", None)
    if fmt != ARCHITECTURE_FORMAT:
        raise ValueError(f"{path_dir}: {ARCHITECTURE_FILE} has format {fmt!r}, expected {ARCHITECTURE_FORMAT!r}")
    model = SASRec(**asdict(SASRecArchitecture(**arch)))
    model.load_state_dict(safetensors.torch.load(storage.read_bytes(storage.join(path_dir, WEIGHTS_FILE))))
    return model.to(device).eval()
