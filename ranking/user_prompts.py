"""The prompts `recllm infer` gives the model, in the prompt format saved with it: for the sequence style the
user's most recent items as IDs; for the instruction style the sequential task's first template (the one
validation uses), rendered with the run's item names (and user tokens for atomic IDs).
"""

from __future__ import annotations

from data_pipeline.run_layout import RunLayout
from data_pipeline.samples.item_rendering import item_names, read_item_ids, user_names
from data_pipeline.samples.prompt_format import PromptFormat
from data_pipeline.samples.prompt_templates import load_templates
from data_pipeline.samples.tasks import item_joiner, render_items


class PromptBuilder:
    def __init__(self, run_dir: str, num_items: int, num_users: int, max_history: int, user_tokens: bool = True,
                 prompt_format: PromptFormat | None = None):
        layout = RunLayout(run_dir)
        codes, users = read_item_ids(layout.item_ids, with_users=user_tokens)
        self.item_names = item_names(codes, num_items, layout.item_codes)
        self.user_names = user_names(users, num_users)
        self.format = prompt_format or PromptFormat()
        self.template = load_templates("sequential")["next_item"][0]
        sequence = self.format.style == "sequence"
        self.max_history = self.format.max_history if sequence else max_history
        self.joiner = item_joiner(self.item_names) if sequence else None

    def prompt(self, user_id: int, history: list[int]) -> str:
        recent = history[-self.max_history:]
        if self.joiner is not None:
            return self.joiner.join(self.item_names[i] for i in recent)
        text, _ = self.template.render(user=self.user_names[user_id], item="",
                                       history=render_items(self.item_names, recent))
        return text

    def prompt_ids(self, tokenizer, user_ids, histories) -> list[list[int]]:
        """Token ids of each user's prompt, framed as the model was trained."""
        return self.format.prompt_ids(tokenizer, [self.prompt(int(u), list(h)) for u, h in zip(user_ids, histories)])
