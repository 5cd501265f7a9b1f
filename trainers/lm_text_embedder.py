"""The LM side of the semantic scheme's LLM-alignment targets: the run's own LM (``model:``, no new tokens) as
the text embedder `recllm build-ids` passes into the data stage, which never builds a model itself.
"""

from __future__ import annotations

import logging

import numpy as np

from data_pipeline.item_ids.llm_text_targets import TextEmbedder, TextTargetsUnavailable, mean_input_embeddings
from trainers.model_config import ModelConfig

log = logging.getLogger("recllm.item_ids")


def lm_text_embedder(model_cfg: ModelConfig, max_tokens: int) -> TextEmbedder:
    """Texts -> the mean of the LM's input embedding rows over each text's tokens. The LM is built on the first
    call, so a build-ids run that needs no text targets never loads it."""

    def embed(texts: list[str]) -> np.ndarray:
        from trainers.models import build_model

        model, tokenizer = build_model(model_cfg)
        table = model.get_input_embeddings().weight
        if tokenizer is None or table.is_meta:
            raise TextTargetsUnavailable(f"model {model_cfg.size} is built without weights or tokenizer "
                                         "(meta init); give model.checkpoint")
        log.info("LLM-alignment targets from %s input embeddings %s", model_cfg.size, tuple(table.shape))
        return mean_input_embeddings(texts, table, tokenizer, max_tokens)

    return embed
