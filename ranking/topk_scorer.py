"""One model replica's work in `recllm infer`: load the trained model, frame each user's prompt as in training,
and return K distinct valid items per user, by trie-constrained beam search or the multinomial item head.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import torch

from data_pipeline import storage
from data_pipeline.run_layout import RunLayout
from data_pipeline.samples.prompt_format import pad_token_id
from ranking.code_trie import CodeTrie
from ranking.scorer_settings import ScorerSettings

log = logging.getLogger("recllm.infer")


class TopKScorer:
    """Scores users with a loaded model: the trained model of `recllm infer`, or the model in training when the
    trainer measures its valid score (``train.eval_every``), so both use one scorer and one prompt format."""

    def __init__(self, run_dir: str, model, tokenizer, prompt_format, settings: ScorerSettings, num_items: int,
                 num_users: int, device: str = "cpu"):
        from ranking.user_prompts import PromptBuilder

        self.settings, self.device, self.model, self.tokenizer = settings, device, model, tokenizer
        self.text = None
        self.normaliser = prompt_format.item_softmax if prompt_format is not None else "vocabulary"
        self.rerank = prompt_format.item_rerank if prompt_format is not None else "none"
        self.model_version = ""
        self.prompts = PromptBuilder(run_dir, num_items, num_users, settings.max_history, prompt_format=prompt_format)
        layout = RunLayout(run_dir)
        codes = layout.read_item_codes().sort_by("item_id")  # row r = item_id r
        self.items = codes.column("item_id").to_numpy()
        # multinomial with text vectors: an item whose token the model lacks was added since training, and is
        # scored from its text (ranking.text_expert); anywhere else such a token is an error.
        new_from_text = settings.scorer == "multinomial" and storage.exists(layout.text_vectors)
        token_seqs, absent = self._token_sequences(codes, allow_absent=new_from_text)
        if settings.scorer == "multinomial":
            if any(len(s) != 1 for s in token_seqs):
                raise ValueError("infer.scorer=multinomial needs one token per item (ids.scheme=atomic)")
            self.item_token_ids = torch.tensor([s[0] for s in token_seqs], dtype=torch.long)
            self.text = _text_expert(run_dir, settings, len(self.items), absent)
        else:
            needs_end = len({len(s) for s in token_seqs}) > 1
            end = self.tokenizer.eos_token_id
            if self.prompts.joiner:  # in a sequence an item ends where the separator starts
                separator, token_seqs = self.prompts.joined_items(self.tokenizer)
                end = separator[0]
            self.trie = CodeTrie(token_seqs, self.items, vocab_size=len(self.tokenizer),
                                 end_token=end if needs_end else None)
            if self.rerank == "flat":
                if needs_end:
                    raise ValueError("item_rerank=flat needs the same number of codes for every item (semantic IDs)")
                self.code_token_ids = torch.tensor(token_seqs, dtype=torch.long)

    @classmethod
    def from_model_dir(cls, run_dir: str, model_dir: str, settings: ScorerSettings, num_items: int, num_users: int,
                       device: str = "cpu") -> "TopKScorer":
        """The exported model, its tokenizer and the prompt format saved with it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from data_pipeline.samples.prompt_format import PromptFormat

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        local = storage.local_copy(model_dir)  # from_pretrained reads local folders only
        tokenizer = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(device).eval()
        scorer = cls(run_dir, model, tokenizer, PromptFormat.load(model_dir), settings, num_items, num_users, device)
        scorer.model_version = _model_version(model_dir)
        return scorer

    def _token_sequences(self, codes: pa.Table, allow_absent: bool = False) -> tuple[list[list[int]], np.ndarray]:
        """(each item's answer as LM token ids: its new tokens, or its text (subtoken IDs) tokenised as in training;
        bool per item: its tokens are not in the model's vocabulary). Absent tokens are an error unless
        ``allow_absent``, when they stand as token 0 (their scores come from elsewhere)."""
        absent = np.zeros(codes.num_rows, dtype=bool)
        if "text" in codes.column_names and codes.column("text").null_count == 0:
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"]
                    for t in codes.column("text").to_pylist()], absent
        out = []
        vocabulary = self.tokenizer.get_vocab()
        for row, tokens in enumerate(codes.column("tokens").to_pylist()):
            if any(t not in vocabulary for t in tokens):
                if not allow_absent:
                    raise ValueError(f"item tokens {tokens} are not in the model's vocabulary; was the model "
                                     f"trained on these item_ids?")
                absent[row] = True
                out.append([0] * len(tokens))
                continue
            out.append(self.tokenizer.convert_tokens_to_ids(tokens))
        return out, absent

    def _prompt_rows(self, user_ids, histories) -> list[list[int]]:
        return self.prompts.prompt_ids(self.tokenizer, user_ids, histories)

    def _encode(self, user_ids, histories) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask (the multinomial head reads the last position)."""
        rows = self._prompt_rows(user_ids, histories)
        width = max(len(r) for r in rows)
        pad = pad_token_id(self.tokenizer)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def score(self, user_ids: np.ndarray, histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids [N, K] with -1 padding, scores [N, K]) for a batch of users."""
        out_items, out_scores = [], []
        bs = self.settings.batch_size
        for start in range(0, len(user_ids), bs):
            u, h = user_ids[start:start + bs], histories[start:start + bs]
            if self.settings.scorer == "multinomial":
                ids, mask = self._encode(u, h)
                seen = [list(x) for x in h] if self.settings.exclude_seen else None
                idx, scores = multinomial_items(self, ids, mask, seen, h)
                items = self.items[idx.cpu().numpy()]
            else:
                from ranking.constrained_beam_search import constrained_beam_search

                prompt_rows = self._prompt_rows(u, h)
                top_k = self.settings.num_beams if self.settings.exclude_seen else self.settings.top_k
                items, scores = constrained_beam_search(getattr(self.model, "module", self.model), prompt_rows,
                                                        self.trie, self.settings.num_beams, top_k,
                                                        normaliser=self.normaliser)
                if self.rerank == "flat":
                    items, scores = flat_rerank(self, u, h, items, scores)
                items, scores = items.cpu().numpy(), scores.float().cpu().numpy()
                if self.settings.exclude_seen:
                    items, scores = _drop_seen(items, scores, h, self.settings.top_k)
            out_items.append(np.asarray(items)[:, :self.settings.top_k])
            out_scores.append(np.asarray(scores.cpu().numpy() if torch.is_tensor(scores) else scores)[:, :self.settings.top_k])
        return np.concatenate(out_items), np.concatenate(out_scores)


def multinomial_items(scorer: TopKScorer, ids, mask, seen, histories):
    from ranking.multinomial_head import multinomial_topk

    # seen items are dense item_ids; the head indexes item_codes rows, which are in item_id order
    text = scorer.text
    item_scores = None if text is None else (lambda logits: text.scores(logits, histories))
    return multinomial_topk(scorer.model, ids, mask, scorer.item_token_ids, scorer.settings.top_k, seen, item_scores)


def _text_expert(run_dir: str, settings: ScorerSettings, num_items: int, absent: np.ndarray):
    """The text expert of ``ranking.text_expert`` when build-ids wrote item text vectors, else None. Items no train
    sequence holds, and items whose token the model lacks (``absent``), are the untrained ones; the weight is
    the settings' text_weight (0 until `recllm infer` chooses it)."""
    import safetensors.numpy

    from ranking.text_expert import TextExpert, trained_items

    layout = RunLayout(run_dir)
    if not storage.exists(layout.text_vectors):
        return None
    vectors = safetensors.numpy.load(storage.read_bytes(layout.text_vectors))["text_vectors"]
    if len(vectors) != num_items:
        from data_pipeline.errors import DataError

        raise DataError(layout.text_vectors, f"{len(vectors)} text vectors for {num_items} items; run "
                                             "`recllm build-ids` again", field="text_vectors")
    train = layout.read_sequences("train", columns=["history", "target"])
    trained = trained_items(train.column("history").to_pylist(), train.column("target").to_numpy(), num_items)
    trained &= ~absent
    return TextExpert(vectors, trained, settings.text_history, settings.text_weight,
                      untrained_bias=settings.text_untrained_bias)


@torch.no_grad()
def flat_rerank(scorer: TopKScorer, user_ids, histories, items: torch.Tensor,
                scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search's items ([B, K] item_ids, -1 padding) re-ordered by code log-probability plus the flat item
    logit (the prompt's last state times the sum of the item's code rows; its per-user normaliser changes no
    order, so it is left out). Returns the re-ordered items and their combined scores."""
    ids, mask = scorer._encode(user_ids, histories)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = getattr(scorer.model, "module", scorer.model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    last = out.hidden_states[-1][:, -1, :].float()
    codes = scorer.code_token_ids.to(ids.device)[items.clamp(min=0).to(ids.device)]  # item_id r is codes row r
    vectors = model.get_input_embeddings()(codes).float().sum(-2)  # [B, K, H]
    flat = (vectors * last[:, None, :]).sum(-1)
    combined = torch.where(items.to(ids.device) >= 0, scores.float().to(ids.device) + flat, float("-inf"))
    order = torch.argsort(combined, dim=-1, descending=True, stable=True)
    return items.to(ids.device).gather(-1, order), combined.gather(-1, order)


def _drop_seen(items: np.ndarray, scores: np.ndarray, histories, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_i = np.full((len(items), k), -1, dtype=np.int64)
    out_s = np.full((len(items), k), -np.inf, dtype=np.float32)
    for r, (row_i, row_s, hist) in enumerate(zip(items, scores, histories)):
        keep = [(i, s) for i, s in zip(row_i, row_s) if i >= 0 and i not in set(hist)][:k]
        for c, (i, s) in enumerate(keep):
            out_i[r, c], out_s[r, c] = i, s
    return out_i, out_s


def _model_version(model_dir: str) -> str:
    """step + a digest of the weight files' names, sizes and first MiB: changes whenever the model does."""
    import hashlib

    fs, root = storage.filesystem(model_dir)
    digest = hashlib.sha256()
    for w in sorted(p for p in fs.ls(root, detail=False) if p.endswith(".safetensors")):
        digest.update(f"{w.rsplit('/', 1)[-1]}:{fs.size(w)}".encode())
        with fs.open(w, "rb") as f:
            digest.update(f.read(1 << 20))
    info = storage.join(model_dir, "recllm_model.json")
    step = json.loads(storage.read_text(info))["step"] if storage.exists(info) else "na"
    return f"step{step}-{digest.hexdigest()[:12]}"
