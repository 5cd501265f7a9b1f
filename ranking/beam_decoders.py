"""Forward passes for constrained beam search: each user's prompt is prefilled once (left-padded batch), then
every beam takes one token per code level. ``SharedPromptDecoder`` (the LLaMA family: Llama 2/3.x, Mistral,
Qwen2/2.5, Qwen3) runs the decoder layers itself: the prefill stops the last layer at keys/values for all but
the last prompt token, and in the decode steps a user's beams read its prompt keys/values in place.
``CopiedCacheDecoder`` (any Hugging Face causal LM) uses the stock forward with a ``DynamicCache``, copies it to
every beam and reorders the copies each level.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from trainers.model_config import FAMILIES

DECODERS = ("auto", "shared_prompt", "copied_cache")


class CopiedCacheDecoder:
    """The stock forward pass: after the prefill the cache is repeated for every beam, grows by one token per
    level and is reordered by beam origin. Works for any causal LM; copies the prompt's keys/values per beam."""

    def __init__(self, model):
        self.model = model
        self.cache: DynamicCache | None = None

    def prefill(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [users, vocab] of the token after each prompt."""
        input_ids, position_ids = self._left_padded(prompt_ids)
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _left_padded(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids) [users, width], left-padded so that every user's last prompt token sits in
        the last column; sets ``lengths`` and ``attention_mask``."""
        device = self.model.device
        self.lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        if int(self.lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token (BOS)")
        width = int(self.lengths.max())
        input_ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        self.attention_mask = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            input_ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            self.attention_mask[row, width - len(prompt):] = 1
        input_ids, self.attention_mask = input_ids.to(device), self.attention_mask.to(device)
        return input_ids, (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

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
    """LLaMA-family layers run by hand. Prefill: keys/values of every prompt token, the last layer's attention
    output and MLP at the last token only. Decode steps: the beams of a user share its prompt's keys/values:
    attention to the prompt is one matmul per user for all its beams' queries, attention to the code tokens so far
    one per beam, both in one softmax; only the code tokens' keys/values (a few per beam) are stored per beam and
    reordered. The layers' own modules do the rest: projections (with Qwen2's qkv bias), Qwen3's per-head q/k
    norms, the MLP, and the model's rotary embedding (Llama 3's rope scaling included); a layer's sliding window
    (Mistral, Qwen) masks keys as the stock forward does. Expects a plain causal LM of ``FAMILIES`` (the merged
    model inference loads), not a PEFT wrapper."""

    @property
    def layers(self):
        return self.model.model.layers[: self.model.config.num_hidden_layers]

    def _windows(self) -> list[int | None]:
        """Per layer: its sliding window in tokens, or None (Qwen layers say; Mistral's apply to every layer)."""
        default = getattr(self.model.config, "sliding_window", None)
        return [getattr(layer.self_attn, "sliding_window", default) for layer in self.layers]

    def prefill(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [users, vocab] of the token after each prompt, and every layer's prompt keys/values, from the
        layers run here: the last layer needs keys/values of every prompt token but its attention output and MLP
        only at the last one, so those run on one row per user (the stock forward runs them on every token)."""
        input_ids, position_ids = self._left_padded(prompt_ids)
        base, layers = self.model.model, self.layers
        users = len(input_ids)
        hidden = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(hidden, position_ids)  # [users, width, head_dim]
        self.windows = self._windows()
        masks = {window: _prefill_mask(self.attention_mask, window) for window in set(self.windows)}
        # Attention to the prompt in the decode steps runs in float32 whatever the model's dtype, as SDPA
        # accumulates (bf16 scores would be off by ~1e-2); the keys/values are small next to the weights.
        self.prompt_keys, self.prompt_values = [], []
        for index, layer in enumerate(layers):
            attn, mask = layer.self_attn, masks[self.windows[index]]
            normed = layer.input_layernorm(hidden)
            key = _rotated(_heads(attn, "k", normed).transpose(1, 2), cos, sin)
            value = _heads(attn, "v", normed).transpose(1, 2)
            self.prompt_keys.append(key.float())
            self.prompt_values.append(value.float())
            if index == len(layers) - 1:  # only the last token goes on
                normed, hidden, cos, sin = (t[:, -1:] for t in (normed, hidden, cos, sin))
                mask = mask[:, :, -1:]
            queries = normed.shape[1]
            query = _rotated(_heads(attn, "q", normed).transpose(1, 2), cos, sin)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(users, queries, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(base.norm(hidden[:, -1]))

    def expand(self, num_beams: int, steps: int) -> None:
        layers = self.layers
        users, kv_heads, _, head_dim = self.prompt_keys[0].shape
        # Transposed once for all levels: [users, kv_heads, head_dim, width] (the untransposed copy is dropped).
        self.prompt_keys_t = [k.transpose(-1, -2).contiguous() for k in self.prompt_keys]
        self.prompt_keys = None
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
        # Windows that can hide a key within this search (prompt + code tokens); the others are dropped.
        width = self.attention_mask.shape[1]
        self.windows = [w if w is not None and w < width + steps else None for w in self.windows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.model.model
        hidden = base.embed_tokens(tokens)  # [rows, hidden]
        cos, sin = base.rotary_emb(hidden.unsqueeze(1), self.next_position.unsqueeze(0))
        cos, sin = cos[0], sin[0]  # [rows, head_dim]
        self.done += 1
        biases = {w: _window_bias(self.prompt_bias, self.done, w) if w is not None else (self.prompt_bias, None)
                  for w in set(self.windows)}
        for index, layer in enumerate(self.layers):
            prompt_bias, code_bias = biases[self.windows[index]]
            hidden = hidden + self._attention(index, layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                              prompt_bias, code_bias)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.next_position = self.next_position + 1
        return self._head(base.norm(hidden))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head into one [rows, vocab] buffer kept across levels and batches: a fresh one per step is the
        largest tensor of the search, and on the CPU its page faults cost more than its softmax. The caller is
        done with a step's logits before the next step."""
        head = self.model.lm_head
        if type(head) is not torch.nn.Linear or head.bias is not None:
            return head(hidden)
        rows, vocab = len(hidden), head.out_features
        buffer = getattr(self, "_logits", None)
        if buffer is None or buffer.shape[0] < rows or buffer.dtype != hidden.dtype or buffer.device != hidden.device:
            buffer = self._logits = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
        return torch.mm(hidden, head.weight.t(), out=buffer[:rows])

    def _attention(self, index: int, attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   prompt_bias: torch.Tensor, code_bias: torch.Tensor | None) -> torch.Tensor:
        rows, beams, done = len(hidden), self.num_beams, self.done
        users = rows // beams
        prompt_values = self.prompt_values[index]
        _, kv_heads, width, head_dim = prompt_values.shape
        groups = self.model.config.num_attention_heads // kv_heads  # query heads per kv head (GQA)
        query, key, value = (_heads(attn, which, hidden) for which in "qkv")  # [rows, heads, head_dim]
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        self.code_keys[index][:, :, done - 1] = key
        self.code_values[index][:, :, done - 1] = value

        # Everything as [users, kv_heads, beams, groups, ...]: the prompt is the same for all of a user's beams
        # (one matmul per user and kv head), the code tokens are each beam's own: a few per beam, so their
        # scores and values are broadcast products (a batched matmul of thousands of 1-3 wide matrices is slower).
        query = (query.float() * attn.scaling).view(users, beams, kv_heads, groups, head_dim).permute(0, 2, 1, 3, 4)
        code_keys, code_values = (t[:, :, :done].view(users, beams, kv_heads, done, head_dim).permute(0, 2, 1, 3, 4)
                                  for t in (self.code_keys[index], self.code_values[index]))
        prompt_scores = torch.matmul(query.reshape(users, kv_heads, beams * groups, head_dim),
                                     self.prompt_keys_t[index]).view(users, kv_heads, beams, groups, width)
        code_scores = (query.unsqueeze(4) * code_keys.unsqueeze(3)).sum(-1)  # [users, kv_heads, beams, groups, done]
        if code_bias is not None:
            code_scores = code_scores + code_bias
        weights = torch.softmax(torch.cat([prompt_scores.add_(prompt_bias), code_scores], dim=-1), dim=-1)
        out = torch.matmul(weights[..., :width].reshape(users, kv_heads, beams * groups, width), prompt_values)
        out = out.view(users, kv_heads, beams, groups, head_dim) + \
            (weights[..., width:].unsqueeze(-1) * code_values.unsqueeze(3)).sum(-2)
        return attn.o_proj(out.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads * groups * head_dim).to(hidden.dtype))

    def reorder(self, origin: torch.Tensor) -> None:
        for store in (self.code_keys, self.code_values):
            for index, tensor in enumerate(store):
                store[index] = tensor.index_select(0, origin)


def _heads(attn, which: str, hidden: torch.Tensor) -> torch.Tensor:
    """Projection ``which`` (q, k or v) of ``hidden`` [..., hidden] split into heads [..., heads, head_dim], with
    the layer's per-head RMSNorm where it has one (Qwen3's q_norm, k_norm), as the stock attention does."""
    states = getattr(attn, f"{which}_proj")(hidden)
    states = states.view(*states.shape[:-1], -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    return norm(states) if norm is not None else states


def _prefill_mask(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[users, 1, queries, keys] bool: causal over real tokens and, with a sliding window, only the ``window``
    latest columns (the stock mask's ``key > query - window``); a padding query sees only itself, so no softmax
    row is empty (never read)."""
    width = attention_mask.shape[1]
    columns = torch.arange(width, device=attention_mask.device)
    offset = columns[:, None] - columns[None, :]  # query column - key column
    allowed = (offset >= 0) if window is None else (offset >= 0) & (offset < window)
    mask = (allowed & attention_mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=columns.device)
    return mask[:, None]


def _window_bias(prompt_bias: torch.Tensor, done: int, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt bias, code bias or None) for decode step ``done`` under a sliding window: the query sits in column
    width + done - 1 of the stock cache, so a key column c stays visible while c > width + done - 1 - window."""
    width = prompt_bias.shape[-1]
    first = width + done - window  # the first visible column
    columns = torch.arange(width, device=prompt_bias.device)
    prompt = prompt_bias.masked_fill(columns < first, -torch.inf) if first > 0 else prompt_bias
    if first <= width:
        return prompt, None
    code = torch.zeros(done, device=prompt_bias.device).masked_fill(torch.arange(done, device=prompt_bias.device)
                                                                    < first - width, -torch.inf)
    return prompt, code


def _rotated(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one [users, heads, tokens, head_dim] tensor (``apply_rotary_pos_emb`` takes query and
    key at the same positions; the prefill's last layer has queries at the last position only)."""
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def decoder_for(model, kind: str = "auto") -> CopiedCacheDecoder:
    """``auto``: the shared-prompt decoder for the LLaMA family (``FAMILIES``), the copied-cache one for anything
    else."""
    if kind not in DECODERS:
        raise ValueError(f"decoder: {kind!r} is not one of {list(DECODERS)}")
    llama = getattr(model.config, "model_type", None) in FAMILIES
    if kind == "shared_prompt" and not llama:
        raise ValueError(f"the shared-prompt decoder runs the layers of {list(FAMILIES)}; this model is "
                         f"{model.config.model_type!r}")
    return SharedPromptDecoder(model) if kind == "shared_prompt" or (kind == "auto" and llama) \
        else CopiedCacheDecoder(model)
