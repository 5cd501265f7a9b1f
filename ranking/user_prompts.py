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
        """Token ids of each user's prompt, framed as the model was trained. A sequence of names the tokenizer
        splits (sub-token IDs) ends with the separator's tokens, so the next item starts as it did in training."""
        rows = self.format.prompt_ids(tokenizer, [self.prompt(int(u), list(h)) for u, h in zip(user_ids, histories)])
        if self.joiner:
            separator, _ = self.joined_items(tokenizer)
            rows = [row + separator for row in rows]
        return rows

    def joined_items(self, tokenizer) -> tuple[list[int], list[list[int]]]:
        """``joined_item_tokens`` of this run's items, worked out once."""
        if getattr(self, "_joined", None) is None:
            self._joined = joined_item_tokens(tokenizer, self.item_names, self.joiner)
        return self._joined


def joined_item_tokens(tokenizer, names: list[str], joiner: str) -> tuple[list[int], list[list[int]]]:
    """(the separator's tokens, each item's tokens) as the tokenizer splits items written one after another
    (``a, b``), which is how the sequence samples were tokenised: a BPE tokenizer often moves the separator's
    space into the next item's first token, so neither is its standalone tokenisation. Found from ``first +
    joiner + name`` for every name: the separator is the tokens all of them share after ``first``'s."""
    first = tokenizer(names[0], add_special_tokens=False)["input_ids"]
    tails = [tokenizer(names[0] + joiner + n, add_special_tokens=False)["input_ids"] for n in names]
    if any(t[:len(first)] != first for t in tails):
        raise ValueError(f"the tokenizer splits {names[0]!r} differently when {joiner!r} follows it; sub-token "
                         f"sequences need names whose tokens do not merge with the separator")
    tails = [t[len(first):] for t in tails]
    shared = 0
    while all(len(t) > shared + 1 and t[shared] == tails[0][shared] for t in tails):
        shared += 1
    if shared == 0:
        raise ValueError(f"the separator {joiner!r} has no token of its own between items; sub-token sequences "
                         f"need one to mark where an item ends")
    return tails[0][:shared], [t[shared:] for t in tails]
