"""The objective registry: ``train.objective`` names a registered class, as torchtune's config names its loss
component. A recipe registers itself with ``@register_objective(name)`` and brings its own ``build(context)``
(the side data it reads from run_dir), ``loss(model, batch, step, device)`` and ``check(root_config)`` for
the rules that span config sections (run by ``recllm plan`` before anything starts). The training loop only
ever sees this interface. Pure Python: no Ray, no DeepSpeed.

Optional hooks, for a recipe that is not a packed language-model loss (LoID): on the class, ``inputs(cfg)``,
``train_dir(cfg)`` and ``export(cfg, checkpoint_dir, inputs, train_dir)`` (driver side) and
``build_model(cfg, inputs) -> BuiltModel`` (worker); on the instance, ``batches(rank, world)`` (a resumable feed:
``next_batch``, ``epoch``, ``state_dict``/``load_state_dict``), ``validate(model, step, feed, final)`` and
``finish(model)``. ``ray_launch``/``ray_worker`` fall back to the language-model defaults where one is absent.
For `recllm plan`, ``memory_workloads(cfg) -> list[memory_plan.Workload]`` on the class sizes each run it trains.
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
    root: Any = None
    """The whole composed config (RecllmConfig)."""
    world: int = 1
    """Workers in the run."""
    data: Any = None
    """What the recipe's ``build_model`` read and ``build`` may reuse (LoID: the domain's reviews)."""


@dataclass
class BuiltModel:
    """What a recipe's ``build_model`` hands the loop: the module to wrap, its tokenizer, whether checkpoints keep
    only the trainable parameters, side data for ``build``, and the host memory the build took (written to
    train/memory/rank-N.json; None: not recorded)."""

    model: Any
    tokenizer: Any
    trainable_only: bool
    data: Any = None
    host_memory: dict | None = None


OBJECTIVES: dict[str, type] = {}
"""Registered classes by name: the shipped ones once their module is imported, and any a user registers."""
SHIPPED: dict[str, str] = {"sft": "trainers.recipes.objectives", "sequence": "trainers.recipes.objectives",
                           "controlrec": "trainers.recipes.objectives", "cllm4rec": "trainers.recipes.objectives",
                           "loid": "trainers.loid.objective"}
"""The shipped recipes' names and the module that registers each: naming them imports nothing (no torch), and a
run imports only the module of the recipe it names."""


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
    if name not in OBJECTIVES and name in SHIPPED:
        import importlib

        importlib.import_module(SHIPPED[name])
    if name not in OBJECTIVES:
        raise KeyError(f"train.objective: {name!r} is not registered; registered: {registered_objectives()}")
    return OBJECTIVES[name]


def registered_objectives() -> list[str]:
    """Every name ``train.objective`` may take, without importing any recipe."""
    return sorted(set(OBJECTIVES) | set(SHIPPED))
