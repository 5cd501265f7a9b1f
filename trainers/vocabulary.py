"""Adding the recommender's ID tokens to a model's vocabulary: check them, add them to the tokenizer whole, grow the
embedding and an untied head, and set each new row (mean of the old rows plus noise, the mean of the rows of its
text, or a collaborative vector projected to the model's width).

Flow: the model builders (``trainers.models``) call ``extend_vocabulary`` on a built model, or plan the rows
before building when a ZeRO-3 checkpoint is loaded partitioned; nothing here knows about distribution beyond
the ``ShardedBuild`` callbacks it is handed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trainers.model_config import NEW_TOKEN_INITS

if TYPE_CHECKING:
    from trainers.sharded_build import ShardedBuild

log = logging.getLogger("recllm.model")


@dataclass(frozen=True)
class VocabularyPlan:
    """Where the new tokens go: the rows kept from the base vocabulary, the rows needed in all, every token's
    id, and the tokens that have no row yet (fresh) with their ids."""

    base_rows: int
    needed: int
    ids: list[int]
    fresh_tokens: list[str]
    fresh: list[int]


def plan_vocabulary(rows: int, tokenizer: PreTrainedTokenizerBase | None, new_tokens: Sequence[str],
                     init: str) -> VocabularyPlan:
    """Check the new tokens and add them to the tokenizer (whole, never split); ``rows``: the model's rows now."""
    if init not in NEW_TOKEN_INITS:
        raise ValueError(f"new_token_init: {init!r} is not one of {list(NEW_TOKEN_INITS)}")
    tokens = list(new_tokens)
    if not tokens:
        return VocabularyPlan(rows, rows, [], [], [])
    bad = sorted({t for t in tokens if not t or t != t.strip()})
    dupes = sorted(t for t, n in Counter(tokens).items() if n > 1)
    if bad or dupes:
        raise ValueError(f"new tokens: empty or space-padded {bad[:5]}, repeated {dupes[:5]}")
    if tokenizer is None:
        ids = list(range(rows, rows + len(tokens)))
        return VocabularyPlan(rows, rows + len(tokens), ids, tokens, ids)
    base_rows = min(rows, len(tokenizer))
    if rows > len(tokenizer):
        log.warning("the model has %d embedding rows but the tokenizer %d tokens: new tokens take ids from %d "
                    "and their rows are initialised afresh", rows, len(tokenizer), len(tokenizer))
    vocab, added = tokenizer.get_vocab(), tokenizer.get_added_vocab()
    clashes = [t for t in tokens if t in vocab and t not in added]
    if clashes:
        raise ValueError(f"new tokens already in the base vocabulary (they would share its rows): {clashes[:5]}")
    fresh_tokens = [t for t in tokens if t not in vocab]
    tokenizer.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                     special=False) for t in fresh_tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return VocabularyPlan(base_rows, max(rows, max(ids) + 1), ids, fresh_tokens,
                           tokenizer.convert_tokens_to_ids(fresh_tokens))


def fresh_token_vectors(plan: VocabularyPlan, vocab: dict) -> list[np.ndarray | None] | None:
    token_vectors = vocab.get("token_vectors")
    return [token_vectors.get(t) for t in plan.fresh_tokens] if vocab["init"] == "collab" and token_vectors else None


def log_vocabulary(plan: VocabularyPlan, pieces: list, vectors: list | None, noise: float) -> None:
    from_text = sum(p is not None for p in pieces)
    collab = sum(v is not None for v in vectors) if vectors else 0
    log.info("vocabulary: %d tokens (%d new: %d from text, %d collaborative, %d mean%s)", plan.needed,
             len(plan.fresh), from_text, collab, len(plan.fresh) - from_text - collab,
             f" + noise {noise}" if noise else "")


def extend_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, new_tokens: Sequence[str],
                      *, token_texts: Mapping[str, str] | None = None, init: str = "mean", noise: float = 0.01,
                      seed: int = 0, token_vectors: Mapping[str, np.ndarray] | None = None,
                      sharded: ShardedBuild | None = None) -> list[int]:
    """Add ``new_tokens`` to the tokenizer (whole, never split), grow the embedding and head, and initialise
    the rows of the tokens that were not there before. Returns the ids of ``new_tokens``, in order.

    Tokens already added by an earlier extension (a checkpoint of an extended model) keep their rows. Without
    a tokenizer (LLaMA-2 shapes with no checkpoint) the tokens take the ids after the model's vocabulary.
    On the meta device only the shapes change. With ``sharded`` (a random-init model built partitioned under
    ZeRO-3) the embedding and head stay partitioned, each made whole only while its new rows are written; a
    checkpoint is extended as it is loaded instead (``_checkpoint_with_tokens``).
    """
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: a partitioned weight is empty
    plan = plan_vocabulary(rows, tokenizer, new_tokens, init)
    if not plan.ids:
        return []
    if plan.needed != rows:
        if sharded:
            sharded.resize_vocabulary(model, plan.needed)
        else:
            model.resize_token_embeddings(plan.needed, mean_resizing=False)  # rows set below, not HF's sampler
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if model.config.tie_word_embeddings and head is not None and head.weight is not embed:
        raise RuntimeError("resizing untied a tied output head")
    if embed.is_meta or not plan.fresh:
        log.info("vocabulary: %d tokens (%d new)%s", plan.needed, len(plan.fresh),
                 ", meta: shapes only" if embed.is_meta else "")
        return plan.ids
    pieces = text_pieces(tokenizer, plan.fresh_tokens, token_texts, plan.base_rows, init)
    vectors = fresh_token_vectors(plan, {"init": init, "token_vectors": token_vectors})
    fresh, base_rows = plan.fresh, plan.base_rows
    whole = sharded.gather if sharded else lambda params: nullcontext()
    with whole([embed]), torch.no_grad():
        embed[fresh] = new_rows(embed[:base_rows], pieces, noise, seed, vectors).to(embed.dtype)
    if head is not None and head.weight is not embed:
        bias = getattr(head, "bias", None)
        with whole([head.weight] + ([bias] if bias is not None else [])), torch.no_grad():
            head.weight[fresh] = new_rows(head.weight[:base_rows], pieces, noise, seed + 1,
                                           vectors).to(head.weight.dtype)
            if bias is not None:
                bias[fresh] = bias[:base_rows].float().mean().to(bias.dtype)
    log_vocabulary(plan, pieces, vectors, noise)
    return plan.ids


def text_pieces(tokenizer: PreTrainedTokenizerBase | None, tokens: list[str], token_texts: Mapping[str, str] | None,
                 base_rows: int, init: str) -> list[list[int] | None]:
    """Per token: the base-vocabulary ids of its text, or None where it falls back to the mean."""
    if init != "text":
        return [None] * len(tokens)
    if tokenizer is None or not token_texts:
        log.warning("new_token_init=text without %s: every new row falls back to the mean",
                    "a tokenizer" if tokenizer is None else "token texts")
        return [None] * len(tokens)
    out: list[list[int] | None] = []
    for token in tokens:
        text = token_texts.get(token) or ""
        ids = [i for i in tokenizer.encode(text, add_special_tokens=False) if i < base_rows] if text.strip() else []
        out.append(ids or None)
    return out


def new_rows(old: torch.Tensor, pieces: list[list[int] | None], noise: float, seed: int,
              vectors: list[np.ndarray | None] | None = None) -> torch.Tensor:
    """Rows for the new tokens: the mean of their pieces' rows, or the mean of all old rows plus noise scaled
    by the per-dimension std of the old rows. Computed in float32 on the CPU generator, so seeded rows are the
    same on every device. With ``vectors`` (collaborative init) a token that has one gets the mean plus its
    vector through a seeded orthonormal projection to the model's width (dot products kept), scaled to the old
    rows' spread."""
    old32 = old.detach().float()
    mean = old32.mean(dim=0)
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.randn(len(pieces), old32.shape[1], generator=generator).to(old32.device)
    rows = mean.expand(len(pieces), -1) + jitter * (noise * old32.std(dim=0))
    for k, ids in enumerate(pieces):
        if ids is not None:
            rows[k] = old32[ids].mean(dim=0)
    have = [k for k, v in enumerate(vectors or []) if v is not None]
    if have:
        given = torch.as_tensor(np.stack([vectors[k] for k in have]), dtype=torch.float32)
        given = given - given.mean(dim=0)
        width, dim = old32.shape[1], given.shape[1]
        basis = torch.randn(max(width, dim), min(width, dim), generator=torch.Generator().manual_seed(seed + 7))
        basis = torch.linalg.qr(basis).Q  # orthonormal columns
        projected = given @ (basis.T if dim <= width else basis)[:dim, :width]
        scale = old32.std(dim=0).mean() / projected.std(dim=0).mean().clamp_min(1e-12)
        rows[have] = (mean + projected * scale).to(rows.device)
    return rows
