"""The values a recipe and the trainer hand each other (issue #28): what a recipe may read when a worker builds it
(``ObjectiveContext``) and the model a recipe's ``build_model`` returns (``BuiltModel``). A leaf: pure dataclasses,
imported by the registry, the recipe base class and the trainer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
