"""The semantic scheme's quantiser, trained by the build-ids stage and bench/semantic_ids.py alike.

MLP encoder -> L residual codebooks (each initialised by scikit-learn k-means on a seeded batch) -> decoder
rebuilding the embedding from the straight-through quantised latent (behaviour alignment); optionally a
projection of the code prefixes is pulled toward each item's LM text embedding (LLM alignment). Everything
runs under ``pinned_threads`` so a seed gives byte-identical codes whatever the machine's thread count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from torch import nn

from data_pipeline.item_ids.config import IdsConfig

log = logging.getLogger("recllm.item_ids")

ENCODE_CHUNK = 65536
"""Rows encoded at once outside training: bounds the [rows, codes] distance matrix."""


@contextlib.contextmanager
def pinned_threads() -> Iterator[None]:
    """One torch, OpenMP and BLAS thread, and torch's deterministic kernels; restored after.

    Two sources of divergence, both measured on the demo catalogue: the codebooks' gradient is an indexed
    accumulation that torch's CPU kernel does with atomic float adds across threads (a different sum every
    run), and k-means and torch reductions split their sums by thread count. The model is small enough that
    one thread is no slower (16 s vs 75 s for the demo's 150 epochs on 2 busy cores).
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(was_threads)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


@dataclass
class QuantizerLosses:
    """One batch's loss terms; ``total`` is what the optimiser minimises."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor
    llm_alignment: torch.Tensor | None


class ResidualQuantizer(nn.Module):
    def __init__(self, input_dim: int, latent_dim: int, hidden_dim: int, levels: int, codes: int, text_dim: int = 0):
        super().__init__()
        self.dims = {"input_dim": input_dim, "latent_dim": latent_dim, "hidden_dim": hidden_dim,
                     "levels": levels, "codes": codes, "text_dim": text_dim}
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(input_dim))
        self.encoder = _mlp(input_dim, hidden_dim, latent_dim)
        self.decoder = _mlp(latent_dim, hidden_dim, input_dim)
        self.codebooks = nn.Parameter(torch.zeros(levels, codes, latent_dim))
        self.text_projection = nn.Linear(latent_dim, text_dim) if text_dim else None

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def num_codes(self) -> int:
        return self.codebooks.shape[1]

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embeddings [B, input_dim] -> latent [B, latent_dim]."""
        return self.encoder(self.standardise(x))

    def nearest_code(self, residual: torch.Tensor, level: int) -> torch.Tensor:
        book = self.codebooks[level].detach()
        # argmin ||r - c||^2 = argmin (||c||^2 - 2 r.c); ||r||^2 is the same for every code.
        scores = torch.addmm((book * book).sum(1), residual.detach(), book.T, alpha=-2.0)
        return scores.argmin(dim=1)

    def quantise(self, latent: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Greedy residual quantisation: (codes [B, L], code vectors per level, residuals per level)."""
        residual = latent
        codes, vectors, residuals = [], [], []
        for level in range(self.levels):
            code = self.nearest_code(residual, level)
            vector = self.codebooks[level][code]
            codes.append(code)
            vectors.append(vector)
            residuals.append(residual)
            residual = residual - vector.detach()
        return torch.stack(codes, dim=1), vectors, residuals

    def losses(self, x: torch.Tensor, commitment_weight: float, text_target: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None, llm_weight: float = 0.0) -> QuantizerLosses:
        target = self.standardise(x)
        latent = self.encoder(target)
        _, vectors, residuals = self.quantise(latent)
        quantised = torch.stack(vectors).sum(0)
        straight_through = latent + (quantised - latent).detach()
        reconstruction = F.mse_loss(self.decoder(straight_through), target)
        codebook = sum(F.mse_loss(v, r.detach()) for v, r in zip(vectors, residuals))
        commitment = sum(F.mse_loss(r, v.detach()) for v, r in zip(vectors, residuals))
        total = reconstruction + codebook + commitment_weight * commitment
        alignment = None
        if self.text_projection is not None and text_target is not None and llm_weight > 0:
            # Every prefix of the code sequence (coarse to fine) is pulled toward the item's text meaning, so
            # the first levels, which shape the trie, carry it most.
            cumulative = torch.cumsum(torch.stack(vectors, dim=1), dim=1)  # [B, L, latent]
            projected = self.text_projection(cumulative)
            cosine = F.cosine_similarity(projected, text_target.unsqueeze(1), dim=-1).mean(dim=1)
            weight = text_mask.float() if text_mask is not None else torch.ones_like(cosine)
            alignment = ((1.0 - cosine) * weight).sum() / weight.sum().clamp(min=1.0)
            total = total + llm_weight * alignment
        return QuantizerLosses(total, reconstruction, codebook, commitment, alignment)

    @torch.no_grad()
    @pinned_threads()
    def encode_codes(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Catalogue -> (codes [N, L] int64, latents [N, latent] float32, squared quantisation error [N])."""
        codes, latents, errors = [], [], []
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            latent = self.encode(x[start:start + ENCODE_CHUNK])
            code, vectors, _ = self.quantise(latent)
            codes.append(code)
            latents.append(latent)
            errors.append(((latent - torch.stack(vectors).sum(0)) ** 2).sum(1))
        if not codes:
            return (np.zeros((0, self.levels), np.int64), np.zeros((0, self.codebooks.shape[2]), np.float32),
                    np.zeros(0, np.float32))
        return (torch.cat(codes).numpy().astype(np.int64), torch.cat(latents).numpy(),
                torch.cat(errors).numpy())


class LatentDistancePreference:
    """Collision resolution's preference for the semantic scheme: codes nearer the item's residual come first."""

    def __init__(self, codebooks: np.ndarray, latents: np.ndarray, codes: np.ndarray):
        self.codebooks, self.latents, self.codes = codebooks, latents, codes

    def _residual(self, rows: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        levels = prefix.shape[-1]
        used = sum(self.codebooks[level][prefix[..., level]] for level in range(levels)) if levels else 0.0
        return self.latents[rows] - used

    def nearest_last_codes(self, rows: np.ndarray, k: int) -> np.ndarray:
        last = self.codebooks.shape[0] - 1
        book = self.codebooks[last]
        out = np.empty((len(rows), k), dtype=np.int64)
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start:start + ENCODE_CHUNK]
            residual = self._residual(chunk, self.codes[chunk, :last])
            distance = (book * book).sum(1) - 2.0 * residual @ book.T
            nearest = np.argpartition(distance, k - 1, axis=1)[:, :k] if k < book.shape[0] else \
                np.tile(np.arange(book.shape[0]), (len(chunk), 1))
            ranked = np.argsort(np.take_along_axis(distance, nearest, 1), axis=1, kind="stable")
            out[start:start + len(chunk)] = np.take_along_axis(nearest, ranked, 1)
        return out

    def ranked_codes(self, row: int, prefix: np.ndarray) -> np.ndarray:
        residual = self._residual(np.array([row]), prefix[None, :])[0]
        book = self.codebooks[len(prefix)]
        return np.argsort(((book - residual) ** 2).sum(1), kind="stable")


def _kmeans_codebook(points: np.ndarray, num_codes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centres [C, D], label of every point); codes beyond the distinct points get jittered copies."""
    distinct = len(np.unique(points, axis=0))
    k = min(num_codes, distinct)
    km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed).fit(points)
    centres = km.cluster_centers_.astype(np.float32)
    if k < num_codes:
        rng = np.random.default_rng(seed)
        extra = centres[rng.integers(0, k, num_codes - k)]
        centres = np.concatenate([centres, extra + rng.normal(0, 1e-3, extra.shape).astype(np.float32)])
    return centres, km.labels_


def initialise_codebooks(model: ResidualQuantizer, x: torch.Tensor, sample_size: int, seed: int) -> None:
    """Standardisation from the whole catalogue; each level's codebook from k-means on a seeded batch."""
    model.input_mean.copy_(x.mean(0))
    model.input_scale.copy_(x.std(0, unbiased=False).clamp(min=1e-6))
    rng = np.random.default_rng(seed)
    rows = rng.choice(x.shape[0], size=min(sample_size, x.shape[0]), replace=False)
    with torch.no_grad():
        residual = model.encode(x[torch.from_numpy(np.sort(rows))]).numpy()
    for level in range(model.levels):
        centres, labels = _kmeans_codebook(residual, model.num_codes, seed + level)
        model.codebooks.data[level] = torch.from_numpy(centres)
        residual = residual - centres[labels]


@dataclass
class TrainedQuantizer:
    model: ResidualQuantizer
    history: list[dict] = field(default_factory=list)
    """Per-epoch mean of every loss term."""
    seconds: float = 0.0


def train_quantizer(embeddings: np.ndarray, cfg: IdsConfig, seed: int, text_targets: np.ndarray | None = None,
                    text_mask: np.ndarray | None = None) -> TrainedQuantizer:
    """Fit the encoder, decoder and codebooks on the catalogue; byte-identical for a seed at any thread count.

    ``text_targets`` [N, T] (with ``text_mask`` [N] marking items that have text) switch the LLM-alignment
    loss on; without them only the behaviour-alignment terms are trained.
    """
    with pinned_threads(), torch.random.fork_rng(devices=[]):
        return _train_quantizer(embeddings, cfg, seed, text_targets, text_mask)


def _train_quantizer(embeddings: np.ndarray, cfg: IdsConfig, seed: int, text_targets: np.ndarray | None,
                     text_mask: np.ndarray | None) -> TrainedQuantizer:
    start = time.perf_counter()
    torch.manual_seed(seed)
    x = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    use_text = text_targets is not None and cfg.llm_alignment_weight > 0
    text_dim = text_targets.shape[1] if use_text else 0
    model = ResidualQuantizer(x.shape[1], cfg.latent_dim, cfg.hidden_dim, cfg.levels, cfg.codes, text_dim)
    initialise_codebooks(model, x, cfg.kmeans_sample, seed)
    targets = mask = None
    if use_text:
        targets = F.normalize(torch.as_tensor(text_targets, dtype=torch.float32), dim=1)
        mask = torch.as_tensor(text_mask if text_mask is not None else np.ones(len(x), bool))
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            out = model.losses(x[rows], cfg.commitment_weight,
                               targets[rows] if use_text else None, mask[rows] if use_text else None,
                               cfg.llm_alignment_weight)
            optimiser.zero_grad(set_to_none=True)
            out.total.backward()
            optimiser.step()
            for name in ("total", "reconstruction", "codebook", "commitment", "llm_alignment"):
                value = getattr(out, name)
                if value is not None:
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
        history.append({"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}})
        if epoch == 0 or (epoch + 1) % max(1, cfg.epochs // 10) == 0:
            log.info("quantiser epoch %d/%d %s", epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4f}" for k, v in history[-1].items() if k != "epoch"))
    return TrainedQuantizer(model, history, time.perf_counter() - start)


def quantizer_tensors(model: ResidualQuantizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) to save as codebook.safetensors; ``load_quantizer`` rebuilds the model."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return tensors, {k: str(v) for k, v in model.dims.items()}


def load_quantizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> ResidualQuantizer:
    dims = {k: int(metadata[k]) for k in ("input_dim", "latent_dim", "hidden_dim", "levels", "codes", "text_dim")}
    model = ResidualQuantizer(**dims)
    model.load_state_dict({k: v for k, v in tensors.items() if k in model.state_dict()})
    model.eval()
    return model
