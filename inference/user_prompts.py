"""The prompts `recllm infer` gives the model: the sequential task's first template (the one validation uses),
rendered with the run's item names (and user tokens for atomic IDs), framed exactly as in training.
"""

from __future__ import annotations

from data_pipeline import storage
from data_pipeline.samples.item_rendering import item_names, read_item_ids, user_names
from data_pipeline.samples.prompt_templates import load_templates
from data_pipeline.samples.tasks import render_items


class PromptBuilder:
    def __init__(self, run_dir: str, num_items: int, num_users: int, max_history: int, user_tokens: bool = True):
        item_ids_dir = storage.join(run_dir, "item_ids")
        codes, users = read_item_ids(item_ids_dir, with_users=user_tokens)
        self.item_names = item_names(codes, num_items, storage.join(item_ids_dir, "item_codes.parquet"))
        self.user_names = user_names(users, num_users)
        self.template = load_templates("sequential")["next_item"][0]
        self.max_history = max_history

    def prompt(self, user_id: int, history: list[int]) -> str:
        text, _ = self.template.render(user=self.user_names[user_id], item="",
                                       history=render_items(self.item_names, history[-self.max_history:]))
        return text
