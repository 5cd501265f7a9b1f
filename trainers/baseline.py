"""`recllm train-baseline`: SASRec trained on the canonical dataset's train split (each user's train sequence;
valid/test targets never enter it), early-stopped on valid NDCG@10, written to run_dir/baseline/ (weights, item
embeddings, a manifest with the valid score). The one SASRec of a run: build-ids codes its item embeddings
(semantic IDs) and evaluate ranks with it, both reading that folder (``data_pipeline.baseline_files``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import safetensors.numpy
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.baseline_files import (FORMAT, ITEM_EMBEDDINGS_FILE, baseline_dir, baseline_settings,
                                          dataset_fingerprint)
from data_pipeline.config_schema import ConfigError
from data_pipeline.errors import DataError
from data_pipeline.run_layout import (MANIFEST_FILE, NO_DATASET, RunLayout, read_dataset_manifest, read_sequences,
                                      sequences_dir)
from ranking.ranking_metrics import DEFAULT_KS, catalogue_coverage, ranking_metrics
from trainers.metrics_logger import MetricsLogger
from trainers.sasrec import PAD, SASRec, checkpoint_files, recommend_topk
from trainers.sasrec_config import SASRecConfig

log = logging.getLogger("recllm.sasrec")


# ---------------------------------------------------------------------------------------------
# Reading the canonical dataset


def read_num_items(dataset_dir: str) -> int:
    manifest = read_dataset_manifest(dataset_dir)
    return int(manifest["counts"]["items"])


def read_split_rows(dataset_dir: str, split: str) -> tuple[list[list[int]], np.ndarray]:
    """(histories, targets) of a sequences split; empty when the split has no rows."""
    if not storage.list_files(sequences_dir(dataset_dir, split), ".parquet"):
        return [], np.zeros(0, dtype=np.int64)
    table = read_sequences(dataset_dir, split, columns=["history", "target"])
    return table.column("history").to_pylist(), table.column("target").to_numpy()


def read_train_sequences(dataset_dir: str) -> list[list[int]]:
    """Each user's train sequence: the train row with the longest history (the latest among equals)
    plus its target. Valid and test targets lie after it by construction of the splits."""
    table = read_sequences(dataset_dir, "train")
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
# Metrics: full ranking over the catalogue


def evaluate_topk(model: SASRec, histories: Sequence[Sequence[int]], targets: np.ndarray, exclude_seen: bool,
                  ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k and catalogue coverage of the top-max(k) lists. A catalogue smaller than a k
    ranks all of it (every item is in the top-k, so HR@k counts any target)."""
    kmax = max(ks)
    topk, _ = recommend_topk(model, histories, min(kmax, model.num_items), exclude_seen, batch_size)
    topk = np.pad(topk.numpy(), ((0, 0), (0, kmax - topk.shape[1])), constant_values=-1)  # -1: no item
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
# The stage


def run_train_baseline(cfg: SASRecConfig, run_dir: str, seed: int = 0) -> dict:
    """Train SASRec on run_dir/dataset/ and write run_dir/baseline/ in one staged folder (the folder appears
    complete or not at all; on s3:// the manifest lands last); returns the manifest."""
    layout = RunLayout(run_dir)
    dataset_dir = layout.dataset
    if not storage.exists(layout.dataset_manifest):
        raise DataError(layout.dataset_manifest, NO_DATASET)
    fingerprint = dataset_fingerprint(run_dir)
    out = baseline_dir(run_dir)
    result = train_sasrec(dataset_dir, cfg, seed=seed)
    embeddings = {"item_embeddings": result.model.item_embeddings().float().numpy()}
    manifest = {"format": FORMAT, "model": "sasrec", "settings": baseline_settings(cfg, seed), "dataset": fingerprint,
                "items": result.model.num_items, "valid": result.valid_metrics, "best_epoch": result.best_epoch,
                "train_seconds": round(result.train_seconds, 2), "losses": result.losses, "history": result.history}
    with storage.staged_folder(out) as staged:
        for name, data in checkpoint_files(result.model).items():
            staged.write_bytes(name, data)
        staged.write_bytes(ITEM_EMBEDDINGS_FILE, safetensors.numpy.save(embeddings))
        manifest["files"] = dict(sorted(staged.files.items()))
        staged.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    log.info("wrote %s: SASRec, best epoch %d, valid NDCG@10 %s", out, result.best_epoch,
             result.valid_metrics.get("NDCG@10"))
    return manifest
