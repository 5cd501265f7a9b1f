"""The losses the shared trainer optimises, one registered class per recipe: plain alignment SFT (packed
next-token loss), sequence-level ID training (every item of a user's sequence, softmax restricted to the
target's ID group), ControlRec (+ heterogeneous feature matching, instruction contrast, visibility matrix) and
CLLM4Rec (item-token and vocabulary-only softmaxes, mutual regularization of collaborative/content rows).

``build_objective`` builds the one ``train.objective`` names (see ``registry``); ``ray_worker`` calls
``objective.loss(model, batch, step, device)`` once per micro-step. Pure torch: the model may be a DeepSpeed
engine, but nothing here knows it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from data_pipeline.item_ids.atomic_ids import CONTENT_PREFIX, content_twin
from data_pipeline.run_layout import RunLayout
from ranking.code_trie import CodeTrie
from ranking.constrained_beam_search import build_token_trie
from trainers.recipes.contrastive_losses import hfm_loss, icl_loss, icl_weight, mean_pool
from trainers.recipes.controlrec_data import ControlRecData
from trainers.recipes.item_level_loss import ItemCodeIndex, item_level_loss, item_starts
from trainers.recipes.recipe import PackedLMRecipe
from trainers.recipes.registry import ObjectiveContext, objective_class, register_objective
from trainers.recipes.restricted_softmax import (grouped_token_loss, labelled_positions, mutual_regularization,
                                                 restricted_token_loss, token_groups)
from trainers.recipes.visibility import visibility_mask
from trainers.sft_objective import packed_lm_loss
from data_pipeline.samples.prompt_format import pad_token_id

log = logging.getLogger("recllm.train")


@register_objective("sft")
class SFTObjective(PackedLMRecipe):
    """Next-token cross-entropy on the response tokens of packed rows."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    @classmethod
    def build(cls, ctx: ObjectiveContext):
        return cls(len(ctx.tasks))

    @staticmethod
    def check(root) -> list[str]:
        """Rules across config sections this objective needs (``recllm plan`` runs them before Ray starts)."""
        return []

    def lm_forward(self, model, batch, device):
        return model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                     use_cache=False)

    def loss(self, model, batch, step: int, device) -> tuple[torch.Tensor, np.ndarray, dict[str, float]]:
        out = self.lm_forward(model, batch, device)
        loss, per_task = packed_lm_loss(out.logits, batch.labels.to(device), batch.task_ids.to(device), self.num_tasks)
        return loss, per_task, {}


def _states_at_labels(model, batch, device):
    """(last hidden states [N, H] at the N positions that predict a label, their flat positions, targets,
    tasks)."""
    out = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    index, target, tasks = labelled_positions(batch.labels.to(device), batch.task_ids.to(device))
    return hidden[:, :-1, :].reshape(-1, hidden.shape[-1])[index], index, target, tasks


def _head_at_labels(model, batch, device):
    """(logits [N, V] at the N positions that predict a label, their targets, their tasks). The head runs only
    where a label is predicted: with a token per item the vocabulary is large, and logits for every packed
    position would cost more than the rest of the model."""
    states, _, target, tasks = _states_at_labels(model, batch, device)
    net = model.module if hasattr(model, "module") else model
    return net.get_output_embeddings()(states), target, tasks


@register_objective("sequence")
class SequenceObjective(SFTObjective):
    """Sequence-level ID training: every item of the ``user_sequence`` samples is a target, teacher-forced, and
    each is scored by a softmax over its ID group only (atomic IDs: all item tokens, CLLM4Rec's multinomial head;
    semantic IDs: that code level's tokens, what the constrained decoder reads; sub-token IDs: the whole
    vocabulary). Labels outside every group there (the closing EOS) are not scored. Other tasks, when on, keep
    the full-vocabulary next-token loss, so the alignment tasks compose with it."""

    def __init__(self, num_tasks: int, sequence_task: int | None, group_of: torch.Tensor, groups: list[torch.Tensor],
                 trie: CodeTrie | None = None, items: ItemCodeIndex | None = None, item_loss: float = 0.0):
        super().__init__(num_tasks)
        self.sequence_task, self.group_of, self.groups, self.trie = sequence_task, group_of, groups, trie
        self.items, self.item_loss = items, item_loss

    @classmethod
    def build(cls, ctx: ObjectiveContext):
        codes = RunLayout(ctx.run_dir).read_item_codes()
        token_seqs = ([] if "text" in codes.column_names and codes.column("text").null_count == 0
                      else codes.column("tokens").to_pylist())
        group_of, groups = token_groups(ctx.tokenizer, token_seqs, len(ctx.tokenizer))
        task = ctx.tasks.index("user_sequence") if "user_sequence" in ctx.tasks else None
        trie = None
        if ctx.train.sequence.item_softmax == "trie" and groups:
            trie = build_token_trie(RunLayout(ctx.run_dir).item_ids, ctx.tokenizer)
        items, item_loss = None, ctx.train.sequence.item_loss
        if item_loss > 0 and len(groups) > 1 and task is not None:
            code_ids = torch.tensor([ctx.tokenizer.convert_tokens_to_ids(list(t)) for t in token_seqs])
            items = ItemCodeIndex.build(code_ids, groups, len(ctx.tokenizer))
        log.info("sequence objective: %d ID groups of sizes %s, item softmax %s, flat item loss %s", len(groups),
                 [len(g) for g in groups], "trie" if trie is not None else "per_level",
                 item_loss if items is not None else "off")
        return cls(len(ctx.tasks), task, group_of, groups, trie, items, item_loss)

    @staticmethod
    def item_softmax(root) -> str:
        """Grouped schemes (semantic, precomputed, atomic) are trained per level or over trie children
        (``train.sequence.item_softmax``), and beam search reads them the same way; sub-token IDs keep the whole
        vocabulary."""
        return "vocabulary" if root.ids.scheme == "subtoken" else root.train.sequence.item_softmax

    @staticmethod
    def item_rerank(root) -> str:
        """With the flat item loss on, beam search orders its items by code log-probability plus the flat score."""
        return "flat" if root.train.sequence.item_loss > 0 else "none"

    @staticmethod
    def check(root) -> list[str]:
        if "user_sequence" not in root.samples.tasks:
            return [f"train.objective: 'sequence' trains on the user_sequence task; samples.tasks is "
                    f"{root.samples.tasks}"]
        if root.train.sequence.item_loss > 0 and root.ids.scheme != "semantic":
            return [f"train.sequence.item_loss: the flat item softmax beside the codes needs several codes per item "
                    f"(ids.scheme=semantic), got {root.ids.scheme!r}; atomic IDs already have one softmax over items"]
        return []

    def loss(self, model, batch, step: int, device):
        states, index, target, tasks = _states_at_labels(model, batch, device)
        net = model.module if hasattr(model, "module") else model
        loss, per_task = grouped_token_loss(net.get_output_embeddings()(states), target, tasks, self.num_tasks,
                                            self.sequence_task, self.group_of, self.groups, self.trie)
        if self.items is None:
            return loss, per_task, {}
        level = torch.where(tasks == self.sequence_task, self.group_of.to(target.device)[target], -1)
        starts, rows = item_starts(index, target, level, self.items)
        if len(starts) == 0:
            return loss, per_task, {}
        vectors = net.get_input_embeddings()(self.items.code_ids.to(target.device)).sum(1)
        term = item_level_loss(states[starts], rows, vectors)
        return loss + self.item_loss * term, per_task, {"item_loss": term.item()}


@register_objective("controlrec")
class ControlRecObjective(SFTObjective):
    """SFT + w * HFM + lambda_t * ICL; with the visibility matrix as the packed rows' attention mask."""

    def __init__(self, num_tasks: int, cfg, data: ControlRecData, tokenizer, total_steps: int, seed: int,
                 rank: int, attn_implementation: str):
        super().__init__(num_tasks)
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.total_steps, self.seed, self.rank = total_steps, seed, rank
        if cfg.visibility and attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"train.controlrec.visibility needs an attention kernel that takes an additive mask "
                             f"(sdpa or eager), the model uses {attn_implementation!r}: set model.attn_implementation"
                             f"=sdpa, or train.controlrec.visibility=false")
        if cfg.visibility and not data.entities.keys:
            raise ValueError("train.controlrec.visibility needs items named by their IDs (ids.scheme=subtoken or "
                             "atomic): no item name of this run looks like item_N or <item_N>")
        self.pad_id = pad_token_id(tokenizer)
        # Aux texts recur (the catalogue's descriptions, the instruction bank): tokenise each one once.
        self._token_cache: dict[str, list[int]] = {}

    @classmethod
    def build(cls, ctx: ObjectiveContext):
        data = ControlRecData.load(ctx.run_dir, ctx.train.controlrec, max_history=20)
        return cls(len(ctx.tasks), ctx.train.controlrec, data, ctx.tokenizer, ctx.train.max_steps, ctx.seed,
                   ctx.rank, ctx.attn_implementation)

    @staticmethod
    def check(root) -> list[str]:
        problems = []
        c = root.train.controlrec
        if c.visibility and root.model.attn_implementation not in ("sdpa", "eager"):
            problems.append(f"train.controlrec.visibility: needs model.attn_implementation sdpa or eager (an additive "
                            f"mask), got {root.model.attn_implementation!r}; or set train.controlrec.visibility=false")
        if c.visibility and root.ids.scheme not in ("subtoken", "atomic"):
            problems.append(f"train.controlrec.visibility: needs items named by their IDs (ids.scheme subtoken or "
                            f"atomic), got {root.ids.scheme!r}")
        return problems

    def entity_index(self):
        """With the visibility matrix, every packed token names the item/user it belongs to."""
        return self.data.entities if self.cfg.visibility else None

    def _tokens(self, text: str, max_tokens: int) -> list[int]:
        ids = self._token_cache.get(text)
        if ids is None:
            ids = self._token_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[:max_tokens] or [self.pad_id]

    def lm_forward(self, model, batch, device):
        kwargs = {}
        if self.cfg.visibility and batch.entity_ids is not None:
            dtype = next(p for p in model.parameters()).dtype
            kwargs["attention_mask"] = visibility_mask(batch.position_ids, batch.entity_ids, self.data.graph,
                                                       dtype).to(device)
        return model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                     use_cache=False, **kwargs)

    def _encode(self, model, texts: list[str], device, max_tokens: int = 64) -> torch.Tensor:
        """Mean-pooled last decoder states of ``texts`` (one padded forward pass)."""
        ids = [self._tokens(t, max_tokens) for t in texts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False, logits_to_keep=1)
        return mean_pool(out.hidden_states[-1], mask.to(device))

    def loss(self, model, batch, step: int, device):
        loss, per_task, extras = super().loss(model, batch, step, device)
        rng = np.random.default_rng([self.seed, self.rank, step, 7])
        texts: list[str] = []
        hfm = icl = None
        if self.cfg.hfm:
            hfm = self.data.hfm_texts(rng, self.cfg.hfm_negatives + 1)
            texts += hfm.all_texts()
        if self.cfg.icl:
            icl = self.data.icl_texts(rng, self.cfg.icl_anchors, self.cfg.icl_negatives)
            texts += icl.all_texts()
        if not texts:
            return loss, per_task, extras
        vecs = self._encode(model, texts, device)
        at = 0
        if hfm is not None:
            b = len(hfm.id_texts)
            parts = vecs[at:at + 4 * b].split(b)
            at += 4 * b
            term, hfm_parts = hfm_loss(*parts, temperature=self.cfg.temperature)
            loss = loss + self.cfg.hfm_weight * term
            extras.update({"hfm": term.item(), **hfm_parts})
        if icl is not None:
            a, m = len(icl.anchors), self.cfg.icl_negatives
            anchors, positives = vecs[at:at + a], vecs[at + a:at + 2 * a]
            negatives = vecs[at + 2 * a:at + 2 * a + a * m].reshape(a, m, -1)
            term = icl_loss(anchors, positives, negatives, self.cfg.temperature)
            weight = icl_weight(step, self.total_steps, self.cfg.icl_lambda0)
            loss = loss + weight * term
            extras.update({"icl": term.item(), "icl_weight": weight})
        return loss, per_task, extras


@register_objective("cllm4rec")
class CLLM4RecObjective(SFTObjective):
    """Restricted-softmax LM loss per task + mutual regularization of <item_N>/<text_item_N> rows."""

    def __init__(self, num_tasks: int, cfg, tasks: list[str], tokenizer, new_tokens: list[str], item_tokens: list[str]):
        super().__init__(num_tasks)
        self.cfg = cfg
        vocab = len(tokenizer)
        item_ids = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(item_tokens)), dtype=torch.long)
        new_ids = set(tokenizer.convert_tokens_to_ids(new_tokens))
        base_ids = torch.tensor([i for i in range(vocab) if i not in new_ids], dtype=torch.long)
        self.restrictions: dict[int, torch.Tensor] = {}
        for t, name in enumerate(tasks):
            if name in ("sequential", "user_sequence") and cfg.multinomial_head:  # one answer, or every item
                self.restrictions[t] = item_ids
            elif name == "collaborative_lm" and cfg.collaborative_restricted:
                self.restrictions[t] = item_ids
            elif name == "content_lm" and cfg.content_restricted:
                self.restrictions[t] = base_ids
        known = set(new_tokens)
        self.partner = torch.full((vocab,), -1, dtype=torch.long)
        pairs = [(tok, content_twin(tok)) for tok in new_tokens
                 if not tok.startswith(CONTENT_PREFIX) and content_twin(tok) in known]
        if pairs:
            a = tokenizer.convert_tokens_to_ids([p[0] for p in pairs])
            b = tokenizer.convert_tokens_to_ids([p[1] for p in pairs])
            self.partner[torch.tensor(a)] = torch.tensor(b)
        self.has_twins = bool(pairs)
        log.info("cllm4rec: restricted softmax on tasks %s; %d collaborative/content token pairs",
                 [tasks[t] for t in self.restrictions], len(pairs))

    @classmethod
    def build(cls, ctx: ObjectiveContext):
        from data_pipeline import storage

        codes = storage.read_parquet(RunLayout(ctx.run_dir).item_codes, columns=["tokens"]).column("tokens").to_pylist()
        return cls(len(ctx.tasks), ctx.train.cllm4rec, ctx.tasks, ctx.tokenizer, ctx.new_tokens, [c[0] for c in codes])

    @staticmethod
    def check(root) -> list[str]:
        if root.ids.scheme != "atomic":
            return [f"train.objective: 'cllm4rec' needs one token per item (ids.scheme=atomic), got {root.ids.scheme!r}"]
        return []

    def loss(self, model, batch, step: int, device):
        input_ids = batch.input_ids.to(device)
        pred, target, tasks = _head_at_labels(model, batch, device)
        net = model.module if hasattr(model, "module") else model
        loss, per_task = restricted_token_loss(pred, target, tasks, self.num_tasks, self.restrictions)
        extras: dict[str, float] = {}
        if self.has_twins and self.cfg.mutual_regularization > 0:
            embedding = net.get_input_embeddings()
            reg = mutual_regularization(embedding, input_ids, self.partner, self.cfg.mutual_regularization)
            loss = loss + reg
            extras["mutual_regularization"] = reg.item()
        return loss, per_task, extras


def build_objective(ctx: ObjectiveContext):
    """The objective ``train.objective`` names, built with the side data it reads from run_dir."""
    return objective_class(ctx.train.objective).build(ctx)
