"""Matmul FLOPs one user costs a top-K search, counted from the model's shape alone (attention included, norms and
softmaxes not): the floor the measured rates are compared with, and what `recllm plan` scales a measured rate by
when the configured shape differs from the measured one (inference/capacity_plan.py). Pure arithmetic. Layer 4.
"""

from __future__ import annotations


def _per_token(config) -> tuple[float, float, float, float]:
    """(keys/values, the rest of a layer, attention per context token, the full-vocabulary head) FLOPs."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    kv = 2 * hidden * 2 * kv_dim
    rest = 2 * hidden * q_dim + 2 * q_dim * hidden + 3 * 2 * hidden * inter
    return kv, rest, 2 * 2 * q_dim, 2 * hidden * vocab


def beam_search_flops(config, prompt_tokens: float, levels: int, num_beams: int) -> dict[str, float]:
    """Matmul FLOPs one user costs each search (attention included, norms and softmaxes not), the floor of what
    each can cost. Hugging Face prefills the prompt once per beam and runs every layer on every prompt token; ours
    prefills it once, and its last layer stops at keys/values except at the last token. Both then take
    ``levels - 1`` steps of ``num_beams`` rows through every layer and the full-vocabulary head."""
    layers = config.num_hidden_layers
    kv, rest, attention, head = _per_token(config)  # attention: per token of context
    prompt_layer = kv + rest + attention * prompt_tokens / 2  # a prompt token attends to ~half the prompt
    decode = (num_beams * (levels - 1) * (layers * (kv + rest + attention * prompt_tokens) + head))
    hf = num_beams * (prompt_tokens * layers * prompt_layer + head) + decode
    ours = prompt_tokens * (layers - 1) * prompt_layer + prompt_tokens * kv + rest + attention * prompt_tokens \
        + head + decode
    return {"ours": ours, "hf": hf}


def multinomial_flops(config, prompt_tokens: float, items: int) -> float:
    """The multinomial item head: one forward pass over the prompt, every layer on every token, and the head's
    item rows (one per item) at the last position only."""
    layers = config.num_hidden_layers
    kv, rest, attention, _ = _per_token(config)
    return prompt_tokens * layers * (kv + rest + attention * prompt_tokens / 2) + 2 * config.hidden_size * items
