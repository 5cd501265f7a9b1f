"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item history.

Reads the canonical dataset written by `recllm prepare`; its item embeddings feed the semantic-ID
quantiser and the trained model is the baseline of the evaluation. Training uses each user's train
sequence only (valid/test targets never enter it) and stops early on valid NDCG@10.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_pipeline import storage
from inference.ranking_metrics import DEFAULT_KS, catalogue_coverage, ranking_metrics
from data_pipeline.config_schema import ConfigError
from trainers.metrics_logger import MetricsLogger
from trainers.sasrec_config import SASRecConfig

log = logging.getLogger("recllm.sasrec")

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
# Reading the canonical dataset


def read_num_items(dataset_dir: str) -> int:
    manifest = json.loads(storage.read_text(storage.join(dataset_dir, "manifest.json")))
    return int(manifest["counts"]["items"])


def read_split_rows(dataset_dir: str, split: str) -> tuple[list[list[int]], np.ndarray]:
    """(histories, targets) of a sequences split; empty when the split has no rows."""
    uri = storage.join(dataset_dir, "sequences", split)
    if not storage.list_files(uri, ".parquet"):
        return [], np.zeros(0, dtype=np.int64)
    table = storage.read_parquet(uri, columns=["history", "target"])
    return table.column("history").to_pylist(), table.column("target").to_numpy()


def read_train_sequences(dataset_dir: str) -> list[list[int]]:
    """Each user's train sequence: the train row with the longest history (the latest among equals)
    plus its target. Valid and test targets lie after it by construction of the splits."""
    table = storage.read_parquet(storage.join(dataset_dir, "sequences", "train"))
    users = table.column("user_id").to_numpy()
    lengths = pc.list_value_length(table.column("history")).to_numpy()
    order = np.lexsort((np.arange(len(users)), lengths, users))  # by user, then length, then row order
    is_last = np.r_[users[order][1:] != users[order][:-1], True] if len(order) else np.zeros(0, dtype=bool)
    chosen = table.take(order[is_last])
    return [h + [t] for h, t in zip(chosen.column("history").to_pylist(), chosen.column("target").to_pylist())]


def training_tensors(sequences: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs, targets) tokens [U, max_len]: every position predicts the next item."""
    usable = [s[-(max_len + 1):] for s in sequences if len(s) >= 2]
    inputs = torch.zeros(len(usable), max_len, dtype=torch.long)
    targets = torch.zeros(len(usable), max_len, dtype=torch.long)
    for row, seq in enumerate(usable):
        n = len(seq) - 1
        inputs[row, max_len - n:] = torch.tensor(seq[:-1]) + 1
        targets[row, max_len - n:] = torch.tensor(seq[1:]) + 1
    return inputs, targets


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


def evaluate_topk(model: SASRec, histories: Sequence[Sequence[int]], targets: np.ndarray, exclude_seen: bool,
                  ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k and catalogue coverage of the top-max(k) lists."""
    kmax = max(ks)
    topk, _ = recommend_topk(model, histories, kmax, exclude_seen, batch_size)
    topk = topk.numpy()
    metrics = ranking_metrics(topk, targets, ks)
    metrics[f"Coverage@{kmax}"] = catalogue_coverage(topk, model.num_items)
    return metrics


def evaluate_sasrec(model: SASRec, dataset_dir: str, split: str = "test", exclude_seen: bool = True,
                    ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024) -> dict[str, float]:
    """Metrics of ``model`` on a split (valid or test) of the canonical dataset."""
    histories, targets = read_split_rows(dataset_dir, split)
    if not histories:
        raise ValueError(f"{dataset_dir}: split {split!r} has no rows to evaluate")
    return evaluate_topk(model, histories, targets, exclude_seen, ks, batch_size)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class SASRecResult:
    model: SASRec
    """The model with the best valid NDCG@10 weights (the last weights when there is no valid split)."""
    losses: list[float]
    """Mean training loss of every epoch run."""
    valid_metrics: dict
    """Valid-split metrics of the returned weights; empty without a valid split."""
    best_epoch: int = 0
    """Epoch whose weights were returned."""
    train_seconds: float = 0.0
    """Wall time of the training loop, evaluation rounds included."""
    history: list[dict] = field(default_factory=list)
    """One {"epoch", "loss", metrics...} entry per validation round."""


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device, num_threads: int) -> Iterator[None]:
    """Seed a private copy of torch's RNG, on CPU force deterministic kernels, set the thread count;
    restore all three after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
            torch.set_num_threads(was_threads)


def _sample_negatives(inputs: torch.Tensor, targets: torch.Tensor, num_items: int,
                      generator: torch.Generator) -> torch.Tensor:
    """One uniform negative token per position, outside the row's own sequence (as in the paper)."""
    negatives = torch.randint(1, num_items + 1, targets.shape, generator=generator)
    sequence = torch.cat([inputs, targets], dim=1)
    for _ in range(20):  # collisions are rare on real catalogues; a few redraws clear them
        clash = (negatives.unsqueeze(-1) == sequence.unsqueeze(1)).any(-1)
        if not clash.any():
            break
        negatives[clash] = torch.randint(1, num_items + 1, (int(clash.sum()),), generator=generator)
    return negatives


def length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator,
                            pool_batches: int = 16) -> list[torch.Tensor]:
    """Row indices in shuffled batches whose rows have similar lengths, so little compute goes to padding.

    Rows are shuffled and cut into pools of ``pool_batches`` batches; each pool is sorted by length and
    cut into batches; the batches are shuffled. Every row appears exactly once.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size * pool_batches):
        pool = order[start:start + batch_size * pool_batches]
        pool = pool[torch.argsort(lengths[pool], stable=True)]
        batches += list(pool.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def _batch_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, loss: str,
                generator: torch.Generator) -> torch.Tensor:
    hidden = model(inputs)
    mask = targets != PAD
    h = hidden[mask]
    if loss == "ce":
        logits = h @ model.item_emb.weight[1:].T
        return F.cross_entropy(logits, targets[mask] - 1)
    negatives = _sample_negatives(inputs.cpu(), targets.cpu(), model.num_items, generator).to(inputs.device)
    pos_logits = (h * model.item_emb(targets[mask])).sum(-1)
    neg_logits = (h * model.item_emb(negatives[mask])).sum(-1)
    return (F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits))
            + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits)))


def _train_one_epoch(model: SASRec, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                     lengths: torch.Tensor, cfg: SASRecConfig, generator: torch.Generator) -> float:
    """One pass over every training user; returns the mean batch loss weighted by batch size."""
    device = model.item_emb.weight.device
    model.train()
    total, count = 0.0, 0
    for rows in length_bucketed_batches(lengths, cfg.batch_size, generator):
        # Drop columns that are padding for every row of the batch (positions are right-aligned).
        width = int(lengths[rows].max())
        loss = _batch_loss(model, inputs[rows, -width:].to(device), targets[rows, -width:].to(device), cfg.loss,
                           generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(rows)
        count += len(rows)
    return total / count


def train_sasrec(dataset_dir: str, cfg: SASRecConfig, seed: int = 0, log_dir: str | None = None) -> SASRecResult:
    """Train on every position of each user's train sequence; keep the weights with the best valid NDCG@10."""
    problems = cfg.check()
    if problems:
        raise ConfigError(problems, "SASRecConfig")
    device = torch.device(cfg.device)
    num_items = read_num_items(dataset_dir)
    inputs, targets = training_tensors(read_train_sequences(dataset_dir), cfg.max_len)
    if len(inputs) == 0:
        raise ValueError(f"{dataset_dir}: no user has a train sequence of 2 or more items")
    lengths = (targets != PAD).sum(1)
    valid_histories, valid_targets = read_split_rows(dataset_dir, "valid")
    log.info("training SASRec on %d users, %d items, %d target positions: %s", len(inputs), num_items,
             int(lengths.sum()), asdict(cfg))

    start = time.perf_counter()
    losses: list[float] = []
    history: list[dict] = []
    best_ndcg, best_epoch, best_state, best_metrics = -1.0, 0, None, {}
    rounds_without_gain = 0
    metrics_log = MetricsLogger(log_dir) if log_dir else None
    with _seeded(seed, device, cfg.num_threads), contextlib.closing(tqdm(
            range(1, cfg.epochs + 1), desc="sasrec", unit="epoch", dynamic_ncols=True)) as bar:
        model = SASRec.from_config(num_items, cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        try:
            for epoch in bar:
                losses.append(_train_one_epoch(model, optimizer, inputs, targets, lengths, cfg, generator))
                if metrics_log:
                    metrics_log.log(epoch, {"sasrec/train_loss": losses[-1]})
                bar.set_postfix(loss=f"{losses[-1]:.4f}", best_epoch=best_epoch)
                if not valid_histories or (epoch % cfg.eval_every and epoch != cfg.epochs):
                    continue
                metrics = evaluate_topk(model, valid_histories, valid_targets, cfg.eval_exclude_seen,
                                        batch_size=cfg.eval_batch_size)
                history.append({"epoch": epoch, "loss": losses[-1], "seconds": time.perf_counter() - start,
                                **metrics})
                if metrics_log:
                    metrics_log.log(epoch, {f"sasrec/valid_{name}": value for name, value in metrics.items()})
                rounds_without_gain += 1
                if metrics["NDCG@10"] > best_ndcg:
                    best_ndcg, best_epoch, best_metrics = metrics["NDCG@10"], epoch, metrics
                    best_state = copy.deepcopy(model.state_dict())
                    rounds_without_gain = 0
                bar.set_postfix(loss=f"{losses[-1]:.4f}", valid_ndcg10=f"{metrics['NDCG@10']:.4f}",
                                best_epoch=best_epoch)
                if rounds_without_gain >= cfg.patience:
                    log.info("early stop at epoch %d: no valid NDCG@10 gain in %d rounds", epoch, cfg.patience)
                    break
        finally:
            if metrics_log:
                metrics_log.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(losses)
    model.eval()
    seconds = time.perf_counter() - start
    log.info("SASRec done in %.1fs, best epoch %d, valid %s", seconds, best_epoch,
             {k: round(v, 4) for k, v in best_metrics.items()})
    return SASRecResult(model, losses, best_metrics, best_epoch, seconds, history)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a JSON architecture, never pickle


def save_sasrec(model: SASRec, path_dir: str) -> None:
    """Write ``path_dir``/{model.safetensors, sasrec.json}; the folder appears complete or not at all."""
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    arch = {"format": ARCHITECTURE_FORMAT, **asdict(model.arch)}
    with storage.staged_folder(path_dir) as staged:
        staged.write_bytes(WEIGHTS_FILE, safetensors.torch.save(weights))
        staged.write_bytes(ARCHITECTURE_FILE, json.dumps(arch, indent=2).encode())


def load_sasrec(path_dir: str, device: str = "cpu") -> SASRec:
    """The model saved by ``save_sasrec``, in eval mode on ``device``."""
    arch = json.loads(storage.read_text(storage.join(path_dir, ARCHITECTURE_FILE)))
    fmt = arch.pop("format", None)
    if fmt != ARCHITECTURE_FORMAT:
        raise ValueError(f"{path_dir}: {ARCHITECTURE_FILE} has format {fmt!r}, expected {ARCHITECTURE_FORMAT!r}")
    model = SASRec(**asdict(SASRecArchitecture(**arch)))
    model.load_state_dict(safetensors.torch.load(storage.read_bytes(storage.join(path_dir, WEIGHTS_FILE))))
    return model.to(device).eval()


def cached_sasrec(dataset_dir: str, cfg: SASRecConfig, seed: int, cache_root: str) -> tuple[SASRec, list[float]]:
    """The SASRec for (dataset, config, seed): loaded from ``cache_root``/<key>/ when an earlier stage trained it
    (build-ids trains one for semantic IDs, evaluate needs the same one as its baseline), else trained and saved."""
    manifest = storage.read_text(storage.join(dataset_dir, "manifest.json"))
    key = hashlib.sha256(json.dumps([json.loads(manifest)["files"], asdict(cfg), seed], sort_keys=True)
                         .encode()).hexdigest()[:16]
    folder = storage.join(cache_root, key)
    if storage.exists(storage.join(folder, ARCHITECTURE_FILE)):
        losses = json.loads(storage.read_text(storage.join(folder, "losses.json")))
        log.info("SASRec from %s (trained by an earlier stage)", folder)
        return load_sasrec(folder), losses
    result = train_sasrec(dataset_dir, cfg, seed=seed)
    save_sasrec(result.model, folder)
    fs, path = storage.filesystem(storage.join(folder, "losses.json"))
    with fs.open(path, "w") as f:
        f.write(json.dumps(result.losses))
    return result.model, result.losses
