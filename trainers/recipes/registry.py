"""The objective registry: ``train.objective`` names a registered class, as torchtune's config names its loss
component. A recipe registers itself with ``@register_objective(name)`` and brings its own ``build(context)``
(the side data it reads from run_dir), ``loss(model, batch, step, device)`` and ``check(root_config)`` for
the rules that span config sections (run by ``recllm plan`` before anything starts). The training loop only
ever sees this interface. Pure Python: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class ObjectiveContext:
    """What an objective may read when the trainer builds it on a worker."""

    train: Any
    """The train section (TrainConfig)."""
    tasks: list[str]
    """The sample tasks, in the order of the task ids in packed batches."""
    tokenizer: Any
    new_tokens: list[str]
    run_dir: str
    seed: int
    rank: int
    attn_implementation: str


OBJECTIVES: dict[str, type] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``train.objective=name`` build this class."""

    def register(cls: type) -> type:
        for method in ("build", "loss", "check"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"objective {name!r}: {cls.__name__} has no {method}()")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return register


def objective_class(name: str) -> type:
    import trainers.recipes.objectives  # noqa: F401 - registers the shipped recipes

    if name not in OBJECTIVES:
        raise KeyError(f"train.objective: {name!r} is not registered; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def registered_objectives() -> list[str]:
    import trainers.recipes.objectives  # noqa: F401

    return sorted(OBJECTIVES)
