"""Tiny random checkpoints of each supported family, built in the test that needs them: Llama 3 (GQA, untied
head, llama3 rope scaling), Qwen2 (qkv bias, a sliding-window layer), Qwen3 (per-head q/k norm, head_dim not
hidden/heads) and Mistral (GQA, sliding window shorter than the prompts)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from trainers.models import TINY_TOKENIZER_DIR

FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")


def family_config(family: str, vocab_size: int, *, hidden_size: int = 32, initializer_range: float = 0.02,
                  **overrides) -> PretrainedConfig:
    """The family's config at debug size; ``overrides`` (token ids, sliding_window, ...) win over both."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=256,
                  initializer_range=initializer_range)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    specific = {
        "llama3": (LlamaConfig, dict(tie_word_embeddings=False, rope_parameters=rope)),
        # layer 0 full attention, layer 1 a sliding window
        "qwen2": (Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                                    max_window_layers=1)),
        "qwen3": (Qwen3Config, dict(tie_word_embeddings=False, head_dim=hidden_size // 2)),
        "mistral": (MistralConfig, dict(tie_word_embeddings=True, sliding_window=5)),
    }
    if family not in specific:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    config_class, args = specific[family]
    return config_class(**{**common, **args, **overrides})


def random_family_model(family: str, vocab_size: int, seed: int, *, initializer_range: float = 0.02,
                        **config_args):
    """A random model of ``family`` in eval mode. HF starts biases at 0 and norm weights at 1, which would hide
    a decoder that skips them: both are drawn at random here."""
    config = family_config(family, vocab_size, initializer_range=initializer_range, **config_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, max(initializer_range, 0.1))
                elif "norm" in name:
                    param.uniform_(0.5, 1.5)
    return model.eval()


def save_tiny_checkpoint(family: str, folder: Path, seed: int = 0, hidden_size: int = 64, **config_args) -> Path:
    """A Hugging Face folder (config.json, safetensors, the shipped tiny tokenizer) of a random ``family``
    model over the tiny tokenizer's 4,096 tokens; ``config_args`` (num_hidden_layers, ...) set a bigger shape."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    model = random_family_model(family, len(tokenizer), seed, hidden_size=hidden_size, **config_args,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
