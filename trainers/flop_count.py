"""FLOPs of one trained token and the peak bf16 rate of a GPU: the two halves of MFU. The trainer's metrics
(``ray_worker``) and the GPU suite (``bench/gpu_suite.py``) count them here, from the model's config alone
(works for a meta model, a PeftModel's base, any LLaMA shape).
"""

from __future__ import annotations

PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0), ("A10", 125.0))
"""Dense bf16 tensor-core peak per GPU (vendor datasheets, SXM parts), matched against the device name."""


def peak_bf16_flops(device_name: str) -> float:
    """Peak dense bf16 FLOP/s of the named GPU; 0 when unknown (then no MFU is reported)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return 0.0


def matmul_parameters(config) -> int:
    """Weights a token is multiplied by: every decoder projection and the output head (the input embedding is
    a lookup; a tied head still costs its matmul). Norms and biases are left out."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + 3 * hidden * inter
    return layers * per_layer + hidden * config.vocab_size


def mean_context(position_ids) -> float:
    """Keys a token attends to on average in packed causal rows: a token at position p sees p + 1 keys, since
    positions restart at 0 for every packed sample (the packer's padding is a sample of its own)."""
    return float((position_ids.double() + 1).mean())


def training_flops_per_token(config, context: float, *, frozen_weights: bool = False,
                             recompute: bool = False) -> float:
    """FLOPs of one token's forward and backward pass. Defaults give the model FLOPs that MFU counts:
    6 N (N = ``matmul_parameters``) + 12 x layers x q_dim x ``context`` (scores and weighted values, forward
    2 x 2, backward twice that). ``frozen_weights`` (LoRA) drops the weight gradients: 4 N. ``recompute``
    (gradient checkpointing) adds a second forward pass: 2 N + 4 x layers x q_dim x context."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.num_hidden_layers * config.num_attention_heads * head_dim * context
    linear = (4 if frozen_weights else 6) + (2 if recompute else 0)
    return linear * matmul_parameters(config) + (12 + (4 if recompute else 0)) * attention
