"""The objective registry: ``train.objective`` names a registered class, as torchtune's config names its loss
component. A recipe registers itself with ``@register_objective(name)``; its contract is the typed base class
``trainers.recipes.recipe.PackedLMRecipe``: ``build(context)``, ``loss(model, batch, step, device)`` and
``check(root_config)``, and hooks whose defaults are the packed language model's (inputs, model, sample feed,
validation, export). A class registered without that base (a user's duck-typed objective) gets the defaults mixed
in behind its own methods. Naming a shipped recipe imports nothing: a run imports only the module of the recipe it
names. Pure Python at import: no torch, no Ray, no DeepSpeed.
"""

from __future__ import annotations

from typing import Callable

from trainers.recipes.contract import BuiltModel, ObjectiveContext  # noqa: F401  (the recipes' imports)
from trainers.recipes.names import OBJECTIVES, SHIPPED, registered_objectives  # noqa: F401


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``train.objective=name`` build this class."""

    def register(cls: type) -> type:
        from trainers.recipes.recipe import PackedLMRecipe

        for method in ("build", "loss", "check"):  # the base class's own are placeholders
            if not any(callable(vars(k).get(method)) or isinstance(vars(k).get(method), (classmethod, staticmethod))
                       for k in cls.__mro__ if k not in (PackedLMRecipe, object)):
                raise TypeError(f"objective {name!r}: {cls.__name__} has no {method}()")

        recipe = cls
        if not issubclass(cls, PackedLMRecipe):
            # its own methods first, the packed-LM defaults for the hooks it lacks; named as the class it wraps, so
            # cloudpickle ships it by value when its module is not importable on the workers (a user's notebook)
            recipe = type(cls.__name__, (cls, PackedLMRecipe), {"__module__": cls.__module__,
                                                               "__qualname__": cls.__qualname__})
        recipe.name = name
        OBJECTIVES[name] = recipe
        return cls

    return register


def objective_class(name: str) -> type:
    if name not in OBJECTIVES and name in SHIPPED:
        import importlib

        importlib.import_module(SHIPPED[name])
    if name not in OBJECTIVES:
        raise KeyError(f"train.objective: {name!r} is not registered; registered: {registered_objectives()}")
    return OBJECTIVES[name]
