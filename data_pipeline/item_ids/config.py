"""Config of the item-identifier stage (dataset/ -> item_ids/): which scheme names the items, and how
the semantic quantiser is trained (levels x codes, losses, optimiser, cold-start assignment). The item
embeddings it codes are the baseline's (section ``baseline:``, stage train-baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.config_schema import choice, positive

SCHEMES = ("atomic", "subtoken", "semantic", "precomputed")
SUBTOKEN_NUMBERS = ("catalogue", "collaborative")
MAX_LEVELS = 26
"""Semantic tokens are named <a_12>, <b_7>, ...: one letter per level."""


@dataclass
class IdsConfig:
    scheme: str = "semantic"
    """atomic (one new token per item, and per user unless user_tokens is false) | subtoken (item_123 split by the LM tokenizer) | semantic (learned L x C codes) | precomputed (<name>.index.json)."""
    user_tokens: bool = True
    """atomic: also add one token per user, <user_N> (CLLM4Rec); false names items only, and prompts say 'the user'."""
    content_tokens: bool = False
    """atomic: also add a content twin per item and user, <text_item_N> / <text_user_N>, for CLLM4Rec's content LM (tied to <item_N> by mutual regularization)."""
    subtoken_numbers: str = "catalogue"
    """subtoken: catalogue (item_<dense id>) | collaborative (numbers follow a k-means tree of the baseline's SASRec item vectors, so similar items share leading digits; reads run_dir/baseline/)."""
    seed: int | None = None
    """Seed of the quantiser (k-means, initialisation, batch order); empty uses the run's seed."""
    levels: int = 4
    """semantic: code levels per item (residual quantisation depth)."""
    codes: int = 256
    """semantic: codes per level (codebook size)."""
    latent_dim: int = 32
    """semantic: width of the quantised latent space the codebooks live in."""
    hidden_dim: int = 128
    """semantic: hidden width of the encoder and decoder MLPs (0 makes them linear)."""
    epochs: int = 150
    """semantic: passes over the catalogue when training the quantiser."""
    batch_size: int = 1024
    """semantic: items per optimiser step."""
    lr: float = 1e-3
    """semantic: Adam learning rate of the quantiser."""
    kmeans_sample: int = 16384
    """semantic: items (a seeded random batch) the scikit-learn k-means initialisation of each level is fitted on."""
    commitment_weight: float = 0.25
    """semantic: weight of the commitment term (encoder residual -> its stop-gradient code vector)."""
    llm_alignment: bool = True
    """semantic: pull projected code vectors toward the LM's mean input embedding of the item's title+description (skipped, with a note, when the dataset has no text)."""
    llm_alignment_weight: float = 0.1
    """semantic: weight of the LLM-alignment loss relative to the behaviour reconstruction loss."""
    llm_alignment_max_tokens: int = 256
    """semantic: title+description tokens averaged per item for the LLM-alignment target."""
    assign_only: bool = False
    """semantic: do not train; code the items absent from an existing item_ids/ with its frozen codebook (cold start)."""
    assign_from: str = ""
    """assign_only: the item_ids/ folder holding the frozen codebook and existing codes; empty uses run_dir/item_ids."""
    index_path: str = ""
    """precomputed: the <name>.index.json to import; empty uses <source path>/<name>.index.json from the dataset manifest."""

    def check(self) -> list[str]:
        problems = choice("scheme", self.scheme, SCHEMES) + choice("subtoken_numbers", self.subtoken_numbers,
                                                                    SUBTOKEN_NUMBERS)
        if self.subtoken_numbers != "catalogue" and self.scheme != "subtoken":
            problems.append(f"subtoken_numbers: {self.subtoken_numbers!r} is only read by scheme subtoken, got "
                            f"scheme {self.scheme!r}")
        if self.content_tokens and self.scheme != "atomic":
            problems.append(f"content_tokens: true needs scheme atomic (content twins of <item_N>), got {self.scheme!r}")
        for name in ("levels", "codes", "latent_dim", "epochs", "batch_size", "kmeans_sample", "lr",
                     "llm_alignment_max_tokens"):
            problems += positive(name, getattr(self, name))
        for name in ("hidden_dim", "commitment_weight", "llm_alignment_weight"):
            problems += positive(name, getattr(self, name), allow_zero=True)
        if self.levels is not None and self.levels > MAX_LEVELS:
            problems.append(f"levels: {self.levels} is more than {MAX_LEVELS} (one letter per level in <a_12>)")
        if self.codes is not None and self.codes < 2:
            problems.append(f"codes: {self.codes} must be at least 2")
        if self.levels and self.codes and self.levels > 0 and self.codes >= 2 and self.codes ** self.levels >= 2 ** 62:
            problems.append(f"levels/codes: {self.codes}^{self.levels} code sequences do not fit a 62-bit key; "
                            "use fewer levels or codes")
        if self.assign_only and self.scheme != "semantic":
            problems.append(f"assign_only: true needs scheme semantic (a frozen codebook), got scheme {self.scheme!r}")
        if self.assign_from and not self.assign_only:
            problems.append(f"assign_from: {self.assign_from!r} is only read when assign_only is true")
        if not self.user_tokens and self.scheme != "atomic":
            problems.append(f"user_tokens: false is only read by scheme atomic, got scheme {self.scheme!r}")
        if self.index_path and self.scheme != "precomputed":
            problems.append(f"index_path: {self.index_path!r} is only read by scheme precomputed")
        return problems
