"""The LoID rating model around a (LoRA-carrying) LLaMA: per-domain user/item ID embeddings, a text encoder
(the same LM, mean-pooled over each history review), ID-content attention both ways, and a rating head on the
pooled LM state of the prompt [user ID, item ID, user-reads-item, item-reads-user, text]. Pure torch/peft.

forward(batch) returns the prediction and L = L_rec + lambda * L_cl (losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.loid.batches import ReviewBatch
from trainers.loid.losses import attend_all, in_batch_triplet_loss, rating_mse

PROMPT = " rating of this user for this item:"


class LoIDRegressor(nn.Module):
    """lm: a LlamaForCausalLM or a PeftModel around one (its LoRA adapters are the domain plugins)."""

    def __init__(self, lm: nn.Module, tokenizer, num_users: int, num_items: int, pooling: str = "last",
                 cl_weight: float = 0.1, margin: float = 0.5, rating_mean: float = 4.0):
        super().__init__()
        self.lm = lm
        self.pooling, self.cl_weight, self.margin = pooling, cl_weight, margin
        embed = self._body().embed_tokens.weight
        hidden = embed.shape[1]
        std = float(embed.detach().float().std())
        self.user_emb = nn.Embedding(num_users, hidden)
        self.item_emb = nn.Embedding(num_items, hidden)
        nn.init.normal_(self.user_emb.weight, std=std)
        nn.init.normal_(self.item_emb.weight, std=std)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, rating_mean)  # starts as the global-mean predictor
        self.register_buffer("prompt_ids", torch.tensor(tokenizer(PROMPT, add_special_tokens=False)["input_ids"]),
                             persistent=False)

    def _body(self) -> nn.Module:
        """The LlamaModel inside (LoRA layers are injected in place, so calling it runs the active adapters)."""
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.model

    def encode_reviews(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[U, T] review tokens -> [U, d] content vectors (mean of the last hidden states over real tokens)."""
        states = self._body()(input_ids=tokens, attention_mask=mask.long(), use_cache=False).last_hidden_state
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)

    @staticmethod
    def _gather(content: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = history >= 0
        return content[history.clamp(min=0)], mask  # [B, K, d], [B, K]

    def forward(self, batch: ReviewBatch) -> dict[str, torch.Tensor]:
        u, i = self.user_emb(batch.user_ids), self.item_emb(batch.item_ids)  # [B, d]
        content = self.encode_reviews(batch.review_tokens, batch.review_mask)
        user_reviews, user_mask = self._gather(content, batch.user_history)
        item_reviews, item_mask = self._gather(content, batch.item_history)
        # u_b reads the reviews of every item j in the batch (diagonal: its own item), and i_b every user's.
        u_reads = attend_all(u, self.key(item_reviews), self.value(item_reviews), item_mask)  # [B, B, d]
        i_reads = attend_all(i, self.key(user_reviews), self.value(user_reviews), user_mask)
        own = torch.arange(len(u), device=u.device)
        prefix = torch.stack([u, i, u_reads[own, own], i_reads[own, own]], dim=1)  # [B, 4, d]
        text = self._body().embed_tokens(self.prompt_ids).unsqueeze(0).expand(len(u), -1, -1)
        states = self._body()(inputs_embeds=torch.cat([prefix, text.to(prefix.dtype)], dim=1),
                              use_cache=False).last_hidden_state
        pooled = states[:, -1] if self.pooling == "last" else states.mean(1)
        pred = self.head(pooled).squeeze(-1)
        l_rec = rating_mse(pred, batch.ratings)
        out = {"pred": pred, "l_rec": l_rec}
        if self.cl_weight > 0:
            same_item = batch.item_ids.unsqueeze(0) == batch.item_ids.unsqueeze(1)
            same_user = batch.user_ids.unsqueeze(0) == batch.user_ids.unsqueeze(1)
            l_u = in_batch_triplet_loss(F.normalize(u, dim=-1), F.normalize(u_reads, dim=-1), same_item,
                                        item_mask.any(1), self.margin)
            l_i = in_batch_triplet_loss(F.normalize(i, dim=-1), F.normalize(i_reads, dim=-1), same_user,
                                        user_mask.any(1), self.margin)
            out["l_cl"] = (l_u + l_i) / 2
            out["loss"] = l_rec + self.cl_weight * out["l_cl"]
        else:
            out["l_cl"] = torch.zeros((), device=u.device)
            out["loss"] = l_rec
        return out

    def domain_state(self) -> dict[str, torch.Tensor]:
        """The parts that belong to one domain and are not a plugin: ID embeddings, attention, head."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if not n.startswith("lm.")}
