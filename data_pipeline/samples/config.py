"""Config of the training-sample stage (dataset/ + item_ids/ -> samples/): which tasks, how many negatives,
how prompts are cut, how the output is sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config_schema import positive

TASKS = ("sequential", "text_alignment", "query_alignment", "negative", "collaborative_lm", "content_lm",
         "user_sequence")
DEFAULT_TASKS = ("sequential", "text_alignment", "query_alignment", "negative")


@dataclass
class SamplesConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """Tasks to build: sequential | text_alignment | query_alignment | negative | collaborative_lm | content_lm (CLLM4Rec; text tasks skip items without text) | user_sequence (a user's whole train sequence as item IDs, no template: the sequence-level objective)."""
    negative_ratio: int = 3
    """negative: items the user never interacted with, named as 'not interested', per positive (next) item."""
    max_history_in_prompt: int = 20
    """Most recent history items written into a prompt (sequential, negative, valid)."""
    templates_per_task: int | None = None
    """Use only the first N templates of each task variant; empty uses every template in the data file."""
    seed: int | None = None
    """Seed of template choice, negative sampling and subsets; empty uses the run's seed."""
    num_shards: int = 4
    """Parquet shards of samples/train and samples/valid, by the stable hash of user_id (item_id for user-less tasks)."""
    row_group_size: int = 8192
    """Rows per Parquet row group: the unit the streaming reader schedules."""
    max_samples_per_task: int | None = None
    """Keep at most this many samples per task and in valid/ (a seeded random subset, for quick runs); empty keeps all."""
    max_sequence_items: int = 50
    """user_sequence: most recent train items of a user in their sequence sample (inference reads as many)."""
    max_description_words: int = 64
    """text_alignment: words of an item's description put in a prompt (the rest is cut and marked '...')."""
    query_phrase_words: int = 8
    """query_alignment: words of the key phrase taken from an item's title for its intent sentence."""
    user_tokens: bool = True
    """atomic scheme: name the user by their <user_N> token in prompts (CLLM4Rec); otherwise 'the user'."""

    def check(self) -> list[str]:
        problems = []
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            problems.append(f"tasks: {unknown} not among {list(TASKS)}")
        if not self.tasks:
            problems.append(f"tasks: empty; name at least one of {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            problems.append(f"tasks: {self.tasks} names a task twice")
        for name in ("negative_ratio", "max_history_in_prompt", "max_sequence_items", "num_shards", "row_group_size",
                     "max_description_words", "query_phrase_words"):
            problems += positive(name, getattr(self, name))
        for name in ("templates_per_task", "max_samples_per_task"):
            if getattr(self, name) is not None:
                problems += positive(name, getattr(self, name))
        if self.templates_per_task is not None and self.templates_per_task > 0:
            from data_pipeline.samples.prompt_templates import load_templates

            from data_pipeline.samples.prompt_templates import TEMPLATE_FREE_TASKS

            for task in [t for t in self.tasks if t in TASKS and t not in TEMPLATE_FREE_TASKS]:
                for variant, templates in load_templates(task).items():
                    if len(templates) < self.templates_per_task:
                        problems.append(f"templates_per_task: {self.templates_per_task} but {task}/{variant} "
                                        f"has only {len(templates)} templates")
        return problems
