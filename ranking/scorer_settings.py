"""What the top-K scorer reads (issue #28): one frozen value, built by inference's config
(``InferConfig.scorer_settings``) for `recllm infer` and by the trainer for its valid rounds, so ranking/ never
duck-types a stage's config section. Layer 4 (ranking): imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScorerSettings:
    scorer: str
    """beam: trie-constrained beam search over item codes; multinomial: one softmax over item tokens."""
    top_k: int
    """Items returned per user."""
    num_beams: int
    """Beams per user (>= top_k)."""
    batch_size: int
    """Users per forward batch."""
    exclude_seen: bool
    """Never return an item already in the user's history."""
    max_history: int
    """Most recent items put in the prompt (as in training)."""
    text_history: int
    """The text expert's query: the mean text vector of the user's last this-many history items."""
    text_weight: float
    """Weight of the text expert (0: none)."""
    text_untrained_bias: float
    """Added to the logit of every item no train sequence holds."""
