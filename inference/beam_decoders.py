"""Forward passes for constrained beam search: each user's prompt is prefilled once (left-padded batch, HF
``DynamicCache``), then every beam takes one token per code level. ``SharedPromptDecoder`` (LLaMA) runs the
decoder layers itself so a user's beams read its prompt keys/values in place; ``CopiedCacheDecoder`` (any
Hugging Face causal LM) copies the cache to every beam and reorders the copies each level.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

DECODERS = ("auto", "shared_prompt", "copied_cache")


class CopiedCacheDecoder:
    """The stock forward pass: after the prefill the cache is repeated for every beam, grows by one token per
    level and is reordered by beam origin. Works for any causal LM; copies the prompt's keys/values per beam."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None

    def prefill(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [users, vocab] of the token after each prompt."""
        device = self.model.device
        self.lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        if int(self.lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token (BOS)")
        width = int(self.lengths.max())
        # Left padding: every user's last prompt token sits in the last column.
        input_ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        self.attention_mask = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            input_ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            self.attention_mask[row, width - len(prompt):] = 1
        input_ids, self.attention_mask = input_ids.to(device), self.attention_mask.to(device)
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def expand(self, num_beams: int, steps: int) -> None:
        """Make room for ``num_beams`` beams per user and ``steps`` more tokens each."""
        self.cache.batch_repeat_interleave(num_beams)
        self.attention_mask = self.attention_mask.repeat_interleave(num_beams, dim=0)
        self.next_position = self.lengths.repeat_interleave(num_beams).unsqueeze(1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per beam [rows]; logits [rows, vocab] of the token after it."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=self.attention_mask,
                         position_ids=self.next_position, past_key_values=self.cache, use_cache=True)
        self.next_position = self.next_position + 1
        return out.logits[:, -1]

    def reorder(self, origin: torch.Tensor) -> None:
        """Beam ``r`` continues the beam that was in row ``origin[r]``."""
        self.cache.reorder_cache(origin)


class SharedPromptDecoder(CopiedCacheDecoder):
    """LLaMA decode steps in which the beams of a user share its prompt's keys/values: attention to the prompt is
    one matmul per user for all its beams' queries, attention to the code tokens so far one per beam, both in one
    softmax. Only the code tokens' keys/values (a few per beam) are stored per beam and reordered. The layers'
    own modules (projections, norms, MLP, rotary embedding) do the rest. Expects a plain LlamaForCausalLM
    (the merged model inference loads), not a PEFT wrapper."""

    def expand(self, num_beams: int, steps: int) -> None:
        layers = self.model.model.layers[: self.model.config.num_hidden_layers]
        # Attention runs in float32 whatever the model's dtype, as SDPA accumulates (bf16 scores would be off
        # by ~1e-2); the keys/values are small next to the weights.
        self.prompt_keys = [self.cache.layers[i].keys.float() for i in range(len(layers))]
        self.prompt_values = [self.cache.layers[i].values.float() for i in range(len(layers))]
        self.cache = None
        users, kv_heads, _, head_dim = self.prompt_keys[0].shape
        # Additive mask over prompt columns: left padding is never attended to.
        self.prompt_bias = torch.zeros(self.attention_mask.shape, dtype=torch.float32, device=self.model.device)
        self.prompt_bias.masked_fill_(self.attention_mask == 0, -torch.inf)
        self.prompt_bias = self.prompt_bias[:, None, None, None, :]  # [users, 1, 1, 1, width]
        rows = users * num_beams
        self.code_keys = [torch.zeros(rows, kv_heads, steps, head_dim, device=self.model.device)
                          for _ in layers]
        self.code_values = [torch.zeros_like(k) for k in self.code_keys]
        self.num_beams, self.done = num_beams, 0
        self.next_position = self.lengths.repeat_interleave(num_beams)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.model.model
        hidden = base.embed_tokens(tokens)  # [rows, hidden]
        cos, sin = base.rotary_emb(hidden.unsqueeze(1), self.next_position.unsqueeze(0))
        cos, sin = cos[0], sin[0]  # [rows, head_dim]
        self.done += 1
        for index, layer in enumerate(base.layers[: self.model.config.num_hidden_layers]):
            hidden = hidden + self._attention(index, layer.self_attn, layer.input_layernorm(hidden), cos, sin)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.next_position = self.next_position + 1
        return self.model.lm_head(base.norm(hidden))

    def _attention(self, index: int, attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rows, beams, done = len(hidden), self.num_beams, self.done
        users = rows // beams
        prompt_keys, prompt_values = self.prompt_keys[index], self.prompt_values[index]
        _, kv_heads, width, head_dim = prompt_keys.shape
        groups = self.model.config.num_attention_heads // kv_heads  # query heads per kv head (GQA)
        query = attn.q_proj(hidden).view(rows, kv_heads * groups, head_dim)
        key = attn.k_proj(hidden).view(rows, kv_heads, head_dim)
        value = attn.v_proj(hidden).view(rows, kv_heads, head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        self.code_keys[index][:, :, done - 1] = key
        self.code_values[index][:, :, done - 1] = value

        # Everything as [users, kv_heads, beams, groups, ...]: the prompt is the same for all of a user's beams
        # (one matmul per user and kv head), the code tokens are each beam's own.
        query = (query.float() * attn.scaling).view(users, beams, kv_heads, groups, head_dim).permute(0, 2, 1, 3, 4)
        code_keys, code_values = (t[:, :, :done].view(users, beams, kv_heads, done, head_dim).permute(0, 2, 1, 3, 4)
                                  for t in (self.code_keys[index], self.code_values[index]))
        prompt_scores = torch.matmul(query.reshape(users, kv_heads, beams * groups, head_dim),
                                     prompt_keys.transpose(-1, -2)).view(users, kv_heads, beams, groups, width)
        code_scores = torch.matmul(query, code_keys.transpose(-1, -2))  # [users, kv_heads, beams, groups, done]
        weights = torch.softmax(torch.cat([prompt_scores + self.prompt_bias, code_scores], dim=-1), dim=-1)
        out = torch.matmul(weights[..., :width].reshape(users, kv_heads, beams * groups, width), prompt_values)
        out = out.view(users, kv_heads, beams, groups, head_dim) + torch.matmul(weights[..., width:], code_values)
        return attn.o_proj(out.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads * groups * head_dim).to(hidden.dtype))

    def reorder(self, origin: torch.Tensor) -> None:
        for store in (self.code_keys, self.code_values):
            for index, tensor in enumerate(store):
                store[index] = tensor.index_select(0, origin)


def decoder_for(model, kind: str = "auto") -> CopiedCacheDecoder:
    """``auto``: the shared-prompt decoder for LLaMA models, the copied-cache one for anything else."""
    if kind not in DECODERS:
        raise ValueError(f"decoder: {kind!r} is not one of {list(DECODERS)}")
    llama = getattr(model.config, "model_type", None) == "llama"
    if kind == "shared_prompt" and not llama:
        raise ValueError(f"the shared-prompt decoder runs LLaMA layers; this model is {model.config.model_type!r}")
    return SharedPromptDecoder(model) if kind == "shared_prompt" or (kind == "auto" and llama) \
        else CopiedCacheDecoder(model)
