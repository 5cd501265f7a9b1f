"""Why do semantic IDs trail atomic IDs? A one-process screen of the semantic recipe's knobs on the valid split
(issue #14, item 5), fast enough on 2 CPU cores to try several in an afternoon.

It reads a run_dir where `recllm pipeline configs/scientific_semantic.yaml` has run at least prepare,
train-baseline and build-ids (any ids.levels), builds the pipeline's tiny LLaMA with the run's code tokens
(`trainers.models.tiny`, code rows from the codebook with collab init), trains it on every user's train sequence
with the sequence objective's loss (`grouped_token_loss`: each code scored by a softmax over its level's codes),
and after every epoch scores a fixed seeded sample of valid users with the scorer `recllm infer` uses
(trie-constrained beam search, 20 beams, history excluded). The best epoch's valid HR@10 / NDCG@10 is printed;
test is never read. Not the pipeline (no Ray, no DeepSpeed, its own batch of users per step), so compare its rows
with each other, and confirm a winner with a real pipeline run.

    python bench/semantic_screen.py RUN_DIR [--layers 2] [--dropout 0.1] [--weight-decay 0.1] [--normaliser per_level]
        [--loss per_level|trie] [--embedding-dropout 0.2] [--hidden 128] [--item-loss 1.0] [--schedule cosine]

--item-loss W adds, at each position that predicts an item's first code, W x a softmax over every item whose
logit is the hidden state times the sum of that item's code rows (no new parameters; the beam search is
unchanged). Each epoch then also prints that flat item score's own valid HR@10 / NDCG@10 ("flat").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline import storage  # noqa: E402
from data_pipeline.run_layout import RunLayout  # noqa: E402
from data_pipeline.samples.prompt_format import PromptFormat  # noqa: E402
from inference.config import InferConfig  # noqa: E402
from launcher.config import load_config  # noqa: E402
from ranking.ranking_metrics import hit_rate_at_k, ndcg_at_k  # noqa: E402
from ranking.constrained_beam_search import build_token_trie  # noqa: E402
from ranking.topk_scorer import TopKScorer  # noqa: E402
from trainers.models import tiny  # noqa: E402
from trainers.packed_lm import collaborative_vectors  # noqa: E402
from trainers.recipes.restricted_softmax import grouped_token_loss, token_groups  # noqa: E402
from trainers.validation import valid_sample  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scientific_semantic.yaml"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--users-per-step", type=int, default=64)
    p.add_argument("--normaliser", default="per_level", choices=["per_level", "vocabulary", "trie"])
    p.add_argument("--loss", default="per_level", choices=["per_level", "trie"])
    p.add_argument("--embedding-dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--valid-users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item-loss", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    run = storage.absolute(a.run_dir)
    cfg = load_config(str(CONFIG), [f"run_dir={run}", f"seed={a.seed}"])
    layout = RunLayout(run)
    new_tokens = layout.read_new_tokens()
    model, tok = tiny(new_tokens, hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=4,
                      intermediate_size=4 * a.hidden, attention_dropout=a.dropout, new_token_init="collab",
                      token_vectors=collaborative_vectors(cfg, run, new_tokens), new_token_noise=1.0, seed=a.seed)
    if a.embedding_dropout:
        model.model.embed_tokens.register_forward_hook(
            lambda module, args, out: torch.nn.functional.dropout(out, a.embedding_dropout, module.training))
    codes = layout.read_item_codes().sort_by("item_id")
    item_tokens = [tok.convert_tokens_to_ids(t) for t in codes.column("tokens").to_pylist()]
    group_of, groups = token_groups(tok, codes.column("tokens").to_pylist(), len(tok))
    trie = build_token_trie(layout.item_ids, tok) if a.loss == "trie" else None
    counts = layout.read_manifest()["counts"]
    valid = layout.read_sequences("valid").sort_by("user_id")
    train = valid.column("history").to_pylist()  # a user's train sequence is its valid history
    rows = valid_sample(valid.num_rows, a.valid_users, a.seed)
    users, targets = valid.column("user_id").to_numpy()[rows], valid.column("target").to_numpy()[rows]
    histories = [train[i] for i in rows]
    scorer = TopKScorer(run, model, tok, PromptFormat("sequence", 50, item_softmax=a.normaliser),
                        InferConfig(scorer="beam", num_beams=20, top_k=20, exclude_seen=True,
                                    batch_size=64).scorer_settings(),
                        counts["items"], counts["users"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    total_steps = a.epochs * -(-len(train) // a.users_per_step)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda t: 1.0 if a.schedule == "constant" else 0.5 * (1 + np.cos(np.pi * min(t / total_steps, 1))))
    code_ids = torch.tensor(item_tokens)  # [items, levels]
    first_level = group_of[code_ids[:, 0]][0].item()
    best, waited, start = (-1.0, -1, 0.0), 0, time.time()
    for epoch in range(a.epochs):
        order, total, steps = rng.permutation(len(train)), 0.0, 0
        for s in range(0, len(order), a.users_per_step):
            seqs = [[tok.bos_token_id] + [t for i in train[j][-50:] for t in item_tokens[i]]
                    for j in order[s:s + a.users_per_step]]
            item_seqs = [train[j][-50:] for j in order[s:s + a.users_per_step]]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), tok.eos_token_id)
            labels = torch.full((len(seqs), width), -100)
            item_labels = torch.full((len(seqs), width), -100)
            for r, x in enumerate(seqs):
                ids[r, :len(x)] = torch.tensor(x)
                labels[r, :len(x) - 1] = torch.tensor(x[1:])
                item_labels[r, :len(x) - 1:code_ids.shape[1]] = torch.tensor(item_seqs[r])
            states = model.model(input_ids=ids).last_hidden_state
            hidden = states[labels != -100]
            target = labels[labels != -100]
            loss, _ = grouped_token_loss(model.lm_head(hidden), target, torch.zeros_like(target), 1, 0, group_of,
                                         groups, trie)
            if a.item_loss:
                at = item_labels != -100
                items_matrix = model.lm_head.weight[code_ids].sum(1)
                loss = loss + a.item_loss * torch.nn.functional.cross_entropy(states[at] @ items_matrix.T,
                                                                              item_labels[at])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total, steps = total + loss.item(), steps + 1
        model.eval()
        items, beam_scores = scorer.score(users, histories)
        flat = flat_log_probs(model, tok, code_ids, histories, item_tokens) if a.item_loss else ""
        model.train()
        hr, ndcg = hit_rate_at_k(items, targets, 10), ndcg_at_k(items, targets, 10)
        if a.item_loss:
            both = np.where(items >= 0, beam_scores + np.take_along_axis(flat, np.maximum(items, 0), 1), -np.inf)
            both = np.take_along_axis(items, np.argsort(-both, 1, kind="stable"), 1)
            flat = np.argsort(-flat, 1, kind="stable")[:, :20]
            flat = (f" flat HR@10 {hit_rate_at_k(flat, targets, 10):.4f} NDCG@10 {ndcg_at_k(flat, targets, 10):.4f}"
                    f" beam+flat HR@10 {hit_rate_at_k(both, targets, 10):.4f} NDCG@10 {ndcg_at_k(both, targets, 10):.4f}")
        print(f"epoch {epoch} loss {total / steps:.3f} valid HR@10 {hr:.4f} NDCG@10 {ndcg:.4f}{flat} "
              f"({time.time() - start:.0f} s)", flush=True)
        best, waited = ((ndcg, epoch, hr), 0) if ndcg > best[0] else (best, waited + 1)
        if waited >= a.patience:
            break
    print(f"best epoch {best[1]}: valid HR@10 {best[2]:.4f} NDCG@10 {best[0]:.4f} ({len(rows)} users) {vars(a)}")


@torch.no_grad()
def flat_log_probs(model, tok, code_ids: torch.Tensor, histories: list, item_tokens: list) -> np.ndarray:
    """[users, items] log-softmax of the flat item score (last hidden state x the sum of each item's code rows),
    seen items at -inf."""
    items_matrix = model.lm_head.weight[code_ids].sum(1)
    out = []
    for s in range(0, len(histories), 64):
        seqs = [[tok.bos_token_id] + [t for i in h[-50:] for t in item_tokens[i]] for h in histories[s:s + 64]]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tok.eos_token_id)
        for r, x in enumerate(seqs):
            ids[r, width - len(x):] = torch.tensor(x)  # left-padded so the last position is each user's
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in seqs])[:, None]).long()
        last = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        logits = torch.log_softmax(last @ items_matrix.T, -1)
        for r, h in enumerate(histories[s:s + 64]):
            logits[r, list(h)] = -float("inf")
        out.append(logits.numpy())
    return np.concatenate(out)


if __name__ == "__main__":
    main()
