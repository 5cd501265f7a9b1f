"""Top-K items per user by beam search restricted to valid item codes: the step after training, before ranking.

``constrained_beam_search`` prefills each user's prompt once and then takes one cached forward step per code
level for all users x beams at once (``ranking.beam_decoders``), each beam allowed only its trie children;
``reference_beam_search`` is the slow, plainly correct version (one user at a time, no cache) that the tests
hold the fast one to.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from ranking.beam_decoders import CopiedCacheDecoder, decoder_for
from ranking.code_trie import CodeTrie
from data_pipeline.samples.prompt_format import PromptFormat

# Semantics shared by both versions (the tests check them against each other and against brute force):
# - An item's score is the sum of log p(token | prompt, earlier code tokens) over its code tokens (the end
#   token included, when the trie has one). ``normaliser="vocabulary"``: log-softmax over the model's whole
#   vocabulary (a model trained with next-token loss); ``"per_level"``: log-softmax over the tokens of that code
#   level only, every token on a trie edge at that depth (a model trained with the sequence objective, whose
#   softmax is restricted to each level's codes: the other logits were never trained and would add noise);
#   ``"trie"``: log-softmax over the children of the beam's trie node only (a model trained with the sequence
#   objective's trie softmax: an item's score is then its exact log-likelihood, a hierarchical softmax).
#   Nothing is read from model.generation_config: no sampling, temperature, repetition penalty or length penalty.
# - At each code level the beam set keeps the ``num_beams`` best of: every live beam extended by one allowed
#   token, and every item already complete (shorter code), carried over unchanged.
# - The trie must be prefix-free (no item's code a prefix of another's; build it with an end token if not),
#   so a beam is complete exactly when it reaches a leaf. Codes may have different lengths.
# - The result holds the ``top_k`` best distinct items per user, best first; a user with fewer than
#   ``top_k`` reachable items gets item -1 with score -inf in the remaining places.


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each prompt as training saw it: BOS + ``PromptFormat().frame(prompt)``, cut from the left to
    ``max_prompt_tokens`` (BOS kept), as ``trainers.packing.tokenize_sample`` cuts long prompts."""
    return PromptFormat().prompt_ids(tokenizer, list(prompts), max_prompt_tokens)


def build_token_trie(item_ids_dir: str, tokenizer, end_token: int | None = None) -> CodeTrie:
    """Trie over the LM token ids of every item's code (item_codes.parquet's ``tokens``), which is what the
    search needs: ``CodeTrie.from_item_ids`` numbers codes in the scheme's own space (level-local for
    semantic IDs). Subtoken IDs are not prefix-free: pass ``end_token=tokenizer.eos_token_id``, the token
    training put after every code."""
    from data_pipeline.item_ids.item_codes import read_item_codes

    table = read_item_codes(item_ids_dir)
    pieces = table.column("tokens").to_pylist()
    ids = [tokenizer.convert_tokens_to_ids(p) for p in pieces]
    unknown = sorted({t for p, row in zip(pieces, ids) for t, i in zip(p, row)
                      if i is None or (i == tokenizer.unk_token_id and t != tokenizer.unk_token)})
    if unknown:
        raise ValueError(f"{len(unknown)} code tokens are not in the tokenizer's vocabulary, e.g. {unknown[:5]}; "
                         "was the model built with this run's new tokens?")
    return CodeTrie(ids, table.column("item_id").to_numpy(), vocab_size=len(tokenizer), end_token=end_token,
                    dense_mask_limit=0)  # the search walks the CSR edges; dense masks would go unused


def hf_prefix_allowed_tokens_fn(trie: CodeTrie, prompt_width: int, finished_token: int):
    """The trie as ``model.generate(prefix_allowed_tokens_fn=...)`` wants it, for comparing with Hugging Face
    beam search: prompts left-padded to ``prompt_width``; a prefix with no continuation (a complete item)
    allows only ``finished_token`` (Hugging Face refuses an empty list)."""
    allowed: dict[tuple[int, ...], list[int]] = {}

    def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        prefix = tuple(input_ids[prompt_width:].tolist())
        if prefix not in allowed:
            mask = trie.allowed_next(torch.tensor(prefix, dtype=torch.long).view(1, len(prefix)))[0]
            allowed[prefix] = torch.nonzero(mask).flatten().tolist() or [finished_token]
        return allowed[prefix]

    return allowed_tokens


# ------------------------------------------------------------------------------------------- fast version

@dataclass
class TrieEdges:
    """The trie's CSR edges on the model's device, as the fast search reads them at each level."""

    offsets: list[torch.Tensor]
    """Per level: [nodes + 1] start of each node's children in ``tokens``."""
    tokens: list[torch.Tensor]
    """Per level: the token on each edge; an edge's row is the id of the child it leads to."""
    items: list[torch.Tensor]
    """Per depth 0..L: the item ending at each node, or -1."""
    fanout: list[int]
    """Per level: the most children any node has (the width of a beam's candidate row)."""
    largest_token: int
    level_tokens: list[torch.Tensor] | None = None
    """Per level: the distinct tokens on its edges, what ``normaliser="per_level"`` normalises over; None for the
    whole vocabulary."""
    over_children: bool = False
    """``normaliser="trie"``: each token normalised over its node's children only."""

    @property
    def levels(self) -> int:
        return len(self.offsets)

    @classmethod
    def of(cls, trie: CodeTrie, device: torch.device | str, normaliser: str = "vocabulary") -> "TrieEdges":
        check_prefix_free(trie)
        return cls([o.to(device) for o in trie.offsets], [t.to(device) for t in trie.edge_tokens],
                   [i.to(device) for i in trie.terminal_items],
                   [int((o[1:] - o[:-1]).max()) if len(o) > 1 else 0 for o in trie.offsets],
                   max((int(t.max()) for t in trie.edge_tokens if len(t)), default=-1),
                   level_tokens(trie, device) if normaliser == "per_level" else None, normaliser == "trie")


NORMALISERS = ("vocabulary", "per_level", "trie")


def level_tokens(trie: CodeTrie, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per code level, the distinct tokens on the trie's edges at that depth: the tokens a per-level softmax
    (``normaliser="per_level"``, the sequence objective's restricted softmax) normalises over."""
    return [torch.unique(t).to(device) for t in trie.edge_tokens]


def check_prefix_free(trie: CodeTrie) -> None:
    """Raise if some item's code is a prefix of another's: the search ends a beam at the first item it meets."""
    for depth in range(1, trie.depth):
        children = trie.offsets[depth][1:] - trie.offsets[depth][:-1]
        inner = torch.nonzero((trie.terminal_items[depth] >= 0) & (children > 0)).flatten()
        if len(inner):
            item = int(trie.terminal_items[depth][inner[0]])
            raise ValueError(f"item {item}'s code is a prefix of other items' codes; build the trie with an "
                             "end_token (e.g. the EOS id training appended to every code)")


def constrained_beam_search(model, prompt_ids: Sequence[Sequence[int]], trie: CodeTrie, num_beams: int, top_k: int,
                            *, users_per_batch: int | None = None, decoder: str = "auto",
                            normaliser: str = "vocabulary") -> tuple[torch.Tensor, torch.Tensor]:
    """(item ids LongTensor [users, top_k], scores FloatTensor [users, top_k]), on the CPU, for a causal LM
    ``model`` (a Hugging Face causal LM), prompts of token ids (``encode_prompts``) and a trie over LM token
    ids (``build_token_trie``). Semantics: see the comment at the top of this module.

    Users go through the model ``users_per_batch`` at a time (all at once by default), grouped by prompt
    length: one prefill of the batch's prompts, then users x beams rows for every code level after the
    first. ``decoder`` picks the forward passes (``ranking.beam_decoders``): ``auto`` lets a user's beams
    share its prompt cache for the LLaMA family (Llama, Mistral, Qwen2, Qwen3) and copies the cache to every
    beam otherwise. ``normaliser``: what each token's log-softmax runs over (the comment at the top).
    """
    _check_arguments(num_beams, top_k, normaliser)
    if users_per_batch is not None and users_per_batch < 1:
        raise ValueError(f"users_per_batch must be >= 1, got {users_per_batch}")
    users = len(prompt_ids)
    if users == 0:
        return torch.empty(0, top_k, dtype=torch.long), torch.empty(0, top_k)
    if trie.depth == 0:
        return _empty_result(users, top_k)
    edges = TrieEdges.of(trie, model.device, normaliser)
    step = users_per_batch or users
    # Batches of users with similar prompt lengths waste less of the prefill on padding.
    order = sorted(range(users), key=lambda user: len(prompt_ids[user]))
    forward = decoder_for(model, decoder)  # one for all batches: it keeps its buffers
    with _eval_mode(model):
        parts = [_search_batch(forward, [prompt_ids[u] for u in order[i:i + step]], edges, num_beams, top_k)
                 for i in range(0, users, step)]
    items, scores = _empty_result(users, top_k)
    items[order], scores[order] = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return items, scores


@torch.inference_mode()
def _search_batch(decoder: CopiedCacheDecoder, prompt_ids: Sequence[Sequence[int]], edges: TrieEdges,
                  num_beams: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    users = len(prompt_ids)
    logits = decoder.prefill(prompt_ids)
    if edges.largest_token >= logits.shape[-1]:
        raise ValueError(f"the trie holds token {edges.largest_token} but the model has {logits.shape[-1]} logits")
    device = logits.device
    # Level 0: one beam per user, the root.
    beams = _Beams(nodes=torch.zeros(users, dtype=torch.long, device=device),
                   items=torch.full((users,), -1, dtype=torch.long, device=device),
                   scores=torch.zeros(users, device=device), tokens=None)
    beams, _ = _extend(beams, 0, logits, edges, beams_per_user=1, num_beams=num_beams)
    if edges.levels > 1:
        decoder.expand(num_beams, edges.levels - 1)
    for level in range(1, edges.levels):
        logits = decoder.step(beams.tokens)
        beams, origin = _extend(beams, level, logits, edges, beams_per_user=num_beams, num_beams=num_beams)
        if level + 1 < edges.levels:
            decoder.reorder(origin)
    # Every beam is now complete or dead; _extend keeps each user's beams sorted best first.
    items = beams.items.view(users, num_beams)[:, :top_k]
    scores = beams.scores.view(users, num_beams)[:, :top_k]
    scores = torch.where(items >= 0, scores, torch.full_like(scores, -torch.inf))
    return items.cpu(), scores.float().cpu()


@dataclass
class _Beams:
    nodes: torch.Tensor
    """[rows] trie node at the current depth; -1 once the beam is complete or dead."""
    items: torch.Tensor
    """[rows] the item a complete beam names; -1 otherwise."""
    scores: torch.Tensor
    """[rows] summed log-probability; -inf for a dead beam (a user with fewer candidates than beams)."""
    tokens: torch.Tensor | None
    """[rows] the token the beam took last: the next forward step's input (0 for complete or dead beams)."""


def _extend(beams: _Beams, level: int, logits: torch.Tensor, edges: TrieEdges, beams_per_user: int,
            num_beams: int) -> tuple[_Beams, torch.Tensor]:
    """One level: each beam's candidates are its trie children (gathered from the CSR edges, ``fanout`` wide)
    plus, for a complete beam, staying as it is; each user keeps its ``num_beams`` best. Returns the new
    beams and, per new beam, the row it came from."""
    rows = len(beams.nodes)
    users = rows // beams_per_user
    fanout = edges.fanout[level]
    live = beams.nodes >= 0
    node = beams.nodes.clamp(min=0)
    start = edges.offsets[level][node]
    count = torch.where(live, edges.offsets[level][node + 1] - start, torch.zeros_like(start))
    rank = torch.arange(fanout, device=node.device)
    has_child = rank < count.unsqueeze(1)
    edge = torch.where(has_child, start.unsqueeze(1) + rank, torch.zeros_like(has_child, dtype=torch.long))
    token = edges.tokens[level][edge]
    log_probs = _log_probs_of(logits.float(), token, None if edges.level_tokens is None else edges.level_tokens[level],
                              has_child if edges.over_children else None)
    child_scores = torch.where(has_child, beams.scores.unsqueeze(1) + log_probs,
                               torch.full_like(log_probs, -torch.inf))
    stay_scores = torch.where(beams.items >= 0, beams.scores, torch.full_like(beams.scores, -torch.inf))
    candidates = torch.cat([child_scores, stay_scores.unsqueeze(1)], dim=1).view(users, -1)
    best, pick = candidates.topk(min(num_beams, candidates.shape[1]), dim=1)
    if best.shape[1] < num_beams:  # fewer candidates than beams: the rest are dead
        fill = num_beams - best.shape[1]
        best = torch.cat([best, best.new_full((users, fill), -torch.inf)], dim=1)
        pick = torch.cat([pick, pick.new_zeros(users, fill)], dim=1)
    origin = (torch.arange(users, device=pick.device).unsqueeze(1) * beams_per_user + pick // (fanout + 1)).view(-1)
    column = (pick % (fanout + 1)).view(-1)
    alive = torch.isfinite(best).view(-1)
    stays = column == fanout
    moved = alive & ~stays
    child_column = column.clamp(max=fanout - 1).unsqueeze(1)
    nodes = torch.where(moved, edge[origin].gather(1, child_column).squeeze(1), torch.full_like(origin, -1))
    reached = edges.items[level + 1][nodes.clamp(min=0)]
    items = torch.where(moved, reached, torch.where(alive & stays, beams.items[origin], torch.full_like(origin, -1)))
    tokens = torch.where(moved, token[origin].gather(1, child_column).squeeze(1), torch.zeros_like(origin))
    nodes = torch.where(items >= 0, torch.full_like(nodes, -1), nodes)
    return _Beams(nodes=nodes, items=items, scores=best.view(-1), tokens=tokens), origin


def _log_probs_of(logits: torch.Tensor, token: torch.Tensor, group: torch.Tensor | None = None,
                  children: torch.Tensor | None = None) -> torch.Tensor:
    """log p(token) = logit - logsumexp over the whole vocabulary (or over the ``group`` tokens only, or over the
    [rows, width] ``children`` mask of ``token`` only), for the [rows, width] ``token`` only. Overwrites
    ``logits``: in place, the normaliser makes no [rows, vocab] temporaries (it is a third of a decode step on
    the CPU)."""
    chosen = logits.gather(1, token)
    if children is not None:
        return chosen - torch.logsumexp(chosen.masked_fill(~children, -torch.inf), dim=1, keepdim=True)
    if group is not None:
        return chosen - torch.logsumexp(logits[:, group], dim=1, keepdim=True)
    peak = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
    return chosen - (peak + total.log())


@contextmanager
def _eval_mode(model):
    """Dropout off for the search (adapters may carry some), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_arguments(num_beams: int, top_k: int, normaliser: str) -> None:
    if num_beams < 1 or not 1 <= top_k <= num_beams:
        raise ValueError(f"need 1 <= top_k <= num_beams, got top_k={top_k}, num_beams={num_beams}")
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser: {normaliser!r}; expected one of {list(NORMALISERS)}")


def _empty_result(users: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((users, top_k), -1, dtype=torch.long), torch.full((users, top_k), -torch.inf)


# -------------------------------------------------------------------------------------- reference version

def reference_beam_search(model, prompt_ids: Sequence[Sequence[int]], trie: CodeTrie, num_beams: int,
                          top_k: int, normaliser: str = "vocabulary") -> tuple[torch.Tensor, torch.Tensor]:
    """The same search done plainly: one user at a time, one beam at a time, the whole sequence recomputed
    (no cache, no padding) for every next-token distribution, candidates in Python lists. Slow; for tests."""
    _check_arguments(num_beams, top_k, normaliser)
    check_prefix_free(trie)
    groups = level_tokens(trie) if normaliser == "per_level" else None
    all_items, all_scores = [], []
    with _eval_mode(model):
        for prompt in prompt_ids:
            items, scores = _reference_one_user(model, list(prompt), trie, num_beams, top_k, groups,
                                                over_children=normaliser == "trie")
            all_items.append(items)
            all_scores.append(scores)
    return (torch.tensor(all_items, dtype=torch.long).view(-1, top_k),
            torch.tensor(all_scores, dtype=torch.float32).view(-1, top_k))


def _reference_one_user(model, prompt: list[int], trie: CodeTrie, num_beams: int, top_k: int,
                        groups: list[torch.Tensor] | None, over_children: bool = False) -> tuple[list[int], list[float]]:
    beams: list[tuple[tuple[int, ...], float, int]] = [((), 0.0, -1)]  # (code tokens, score, item or -1)
    for depth in range(trie.depth):
        candidates = []
        for code, score, item in beams:
            if item >= 0:  # complete: competes as it is
                candidates.append((code, score, item))
                continue
            allowed = trie.allowed_next(torch.tensor([code], dtype=torch.long).view(1, len(code)))[0]
            group = torch.nonzero(allowed).flatten() if over_children else None if groups is None else groups[depth]
            log_probs = _next_token_log_probs(model, list(prompt) + list(code), group)
            for token in torch.nonzero(allowed).flatten().tolist():
                longer = code + (token,)
                candidates.append((longer, score + float(log_probs[token]), trie.item_of(list(longer))))
        candidates.sort(key=lambda c: c[1], reverse=True)
        beams = candidates[:num_beams]
    complete = [(item, score) for _, score, item in beams if item >= 0][:top_k]
    complete += [(-1, -float("inf"))] * (top_k - len(complete))
    return [item for item, _ in complete], [score for _, score in complete]


@torch.inference_mode()
def _next_token_log_probs(model, token_ids: list[int], group: torch.Tensor | None) -> torch.Tensor:
    """log-softmax of the next token over the vocabulary, or over ``group`` (-inf for every other token)."""
    logits = model(input_ids=torch.tensor([token_ids], device=model.device)).logits[0, -1].float().cpu()
    if group is None:
        return torch.log_softmax(logits, dim=-1)
    out = torch.full_like(logits, -torch.inf)
    out[group] = torch.log_softmax(logits[group], dim=-1)
    return out
