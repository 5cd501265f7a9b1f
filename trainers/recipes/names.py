"""The names ``train.objective`` may take (issue #28): the registered classes by name and the shipped recipes'
modules. A leaf, so the train config checks a name without importing the registry, a recipe or torch.
"""

from __future__ import annotations

OBJECTIVES: dict[str, type] = {}
"""Registered classes by name: the shipped ones once their module is imported, and any a user registers."""
SHIPPED: dict[str, str] = {"sft": "trainers.recipes.objectives", "sequence": "trainers.recipes.objectives",
                           "controlrec": "trainers.recipes.objectives", "cllm4rec": "trainers.recipes.objectives",
                           "loid": "trainers.loid.objective"}
"""The shipped recipes' names and the module that registers each: naming them imports nothing (no torch), and a
run imports only the module of the recipe it names."""


def registered_objectives() -> list[str]:
    """Every name ``train.objective`` may take, without importing any recipe."""
    return sorted(set(OBJECTIVES) | set(SHIPPED))
