"""Config of ControlRec's review tasks (section ``review_tasks:``): which review domain, which tasks, how the
prompts are filled, and how much of the test split `recllm evaluate-reviews` decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config_schema import positive

REVIEW_TASKS = ("rating", "explanation", "review_summary", "direct_recommendation")


@dataclass
class ReviewTasksConfig:
    domain: str = "musical_instruments"
    """Review domain (a name under reviews.domains) the samples come from."""
    tasks: list[str] = field(default_factory=lambda: list(REVIEW_TASKS))
    """rating | explanation (target: the review text) | review_summary (target: the review's summary) |
    direct_recommendation (pick the reviewed item from candidates)."""
    candidates: int = 5
    """Items offered in direct_recommendation: the true one plus candidates-1 random items the user never reviewed."""
    history_items: int = 5
    """Most recent train items of the user shown in the prompt."""
    review_words: int = 40
    """Review texts are cut to this many words, in prompts and as explanation targets."""
    num_shards: int = 4
    """Parquet files per split of samples/ (the streaming reader spreads them over workers)."""
    eval_per_task: int = 200
    """Test reviews decoded per task by evaluate-reviews (the first ones, in review order)."""
    max_new_tokens: int = 64
    """Longest greedy continuation in evaluate-reviews."""
    eval_batch_size: int = 16
    """Prompts decoded together in evaluate-reviews."""

    def check(self) -> list[str]:
        problems = [f"tasks: {t!r} is not one of {list(REVIEW_TASKS)}" for t in self.tasks if t not in REVIEW_TASKS]
        if not self.tasks:
            problems.append("tasks: empty")
        for name in ("history_items", "review_words", "num_shards", "eval_per_task", "max_new_tokens",
                     "eval_batch_size"):
            problems += positive(name, getattr(self, name))
        if self.candidates < 2:
            problems.append(f"candidates: {self.candidates}; expected >= 2 (the true item and a decoy)")
        return problems
