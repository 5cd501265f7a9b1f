"""Paraphrased prompt templates of the sample stage, read from the package's ``templates/<task>.json``.

Each task file holds variants (e.g. text_alignment: item_to_title, title_to_item, description_to_item), each a
list of {prompt, response} format strings. Loading checks every template's slots against what its variant
fills, so a typo in a data file fails at load time, not halfway through a build.
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass
from importlib import resources

from data_pipeline.errors import DataError

TEMPLATE_PACKAGE = "data_pipeline.samples.templates"

# task -> variant -> (prompt slots that must appear, prompt slots that may appear, response slots exactly)
VARIANT_SLOTS: dict[str, dict[str, tuple[set[str], set[str], set[str]]]] = {
    "sequential": {"next_item": ({"history"}, {"user"}, {"item"})},
    "text_alignment": {
        "item_to_title": ({"item"}, set(), {"title"}),
        "title_to_item": ({"title"}, set(), {"item"}),
        "description_to_item": ({"description"}, set(), {"item"}),
    },
    "query_alignment": {
        "with_category": ({"category", "phrase"}, set(), {"item"}),
        "without_category": ({"phrase"}, set(), {"item"}),
    },
    "negative": {"not_interested": ({"history", "negatives"}, {"user"}, {"item"})},
    "collaborative_lm": {"item_document": ({"user"}, set(), {"items"})},
    "content_lm": {
        "item_text": ({"item"}, set(), {"text"}),
        "user_review": ({"user", "item"}, set(), {"review"}),
    },
}


@dataclass(frozen=True)
class PromptTemplate:
    prompt: str
    response: str

    def render(self, **slots: str) -> tuple[str, str]:
        return self.prompt.format(**slots), self.response.format(**slots)


def _slots(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _check(task: str, variant: str, i: int, tpl: dict, where: str) -> PromptTemplate:
    required, optional, response_slots = VARIANT_SLOTS[task][variant]
    if not isinstance(tpl, dict) or not isinstance(tpl.get("prompt"), str) or not isinstance(tpl.get("response"), str):
        raise DataError(where, "expected {\"prompt\": str, \"response\": str}", row=f"{variant}[{i}]")
    prompt_slots, resp = _slots(tpl["prompt"]), _slots(tpl["response"])
    if not required <= prompt_slots or not prompt_slots <= required | optional:
        raise DataError(where, f"prompt slots {sorted(prompt_slots)}; expected {sorted(required)} "
                               f"plus optionally {sorted(optional)}", row=f"{variant}[{i}]")
    if resp != response_slots:
        raise DataError(where, f"response slots {sorted(resp)}; expected {sorted(response_slots)}", row=f"{variant}[{i}]")
    return PromptTemplate(tpl["prompt"], tpl["response"])


@functools.cache
def load_templates(task: str) -> dict[str, list[PromptTemplate]]:
    """variant -> templates of ``task``, in file order, every one checked."""
    where = f"{TEMPLATE_PACKAGE}/{task}.json"
    if task not in VARIANT_SLOTS:
        raise DataError(where, f"no templates for task {task!r}; tasks: {list(VARIANT_SLOTS)}")
    data = json.loads(resources.files(TEMPLATE_PACKAGE).joinpath(f"{task}.json").read_text(encoding="utf-8"))
    variants = data.get("variants", {})
    if set(variants) != set(VARIANT_SLOTS[task]):
        raise DataError(where, f"variants {sorted(variants)}; expected {sorted(VARIANT_SLOTS[task])}")
    out = {}
    for variant, templates in variants.items():
        if not templates:
            raise DataError(where, "no templates", row=variant)
        out[variant] = [_check(task, variant, i, tpl, where) for i, tpl in enumerate(templates)]
    return out


TEMPLATE_FREE_TASKS = ("user_sequence",)
"""Tasks whose samples have no template (the sequence-level task writes item IDs only)."""


def templates_in_use(task: str, per_variant: int | None) -> dict[str, list[PromptTemplate]]:
    """The first ``per_variant`` templates of each variant (all when None); none for a template-free task."""
    if task in TEMPLATE_FREE_TASKS:
        return {}
    return {v: ts[:per_variant] if per_variant else ts for v, ts in load_templates(task).items()}


INSTRUCTION_BANK = "instruction_bank.json"
MIN_PARAPHRASES = 10


@functools.cache
def load_instruction_bank() -> dict[str, list[str]]:
    """ControlRec's paraphrased instructions per task (``templates/instruction_bank.json``); every task needs
    at least MIN_PARAPHRASES distinct ones and there must be two tasks to contrast."""
    where = f"{TEMPLATE_PACKAGE}/{INSTRUCTION_BANK}"
    data = json.loads(resources.files(TEMPLATE_PACKAGE).joinpath(INSTRUCTION_BANK).read_text(encoding="utf-8"))
    bank = data.get("tasks", {})
    if len(bank) < 2:
        raise DataError(where, f"{len(bank)} task(s); instruction contrast needs at least 2")
    for task, lines in bank.items():
        if not isinstance(lines, list) or not all(isinstance(x, str) and x.strip() for x in lines):
            raise DataError(where, "expected a list of non-empty strings", row=task)
        if len(set(lines)) < MIN_PARAPHRASES:
            raise DataError(where, f"{len(set(lines))} distinct paraphrases; need at least {MIN_PARAPHRASES}",
                            row=task)
    return {task: list(dict.fromkeys(lines)) for task, lines in bank.items()}
