"""The port between a distributed trainer and the model builders (issue #28): what a trainer hands
``trainers.models`` and ``trainers.vocabulary`` when parameters are partitioned as they are created (ZeRO-3).
``trainers.deepspeed_engine`` fills it; the builders call it, and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class ShardedBuild:
    """What a distributed trainer hands the builders when parameters are partitioned as they are created
    (ZeRO-3, see ``trainers.deepspeed_engine.model_init_context``), so that no rank ever holds the whole model."""

    empty_init: Callable[[], AbstractContextManager]
    """A context whose modules are created partitioned and left uninitialised: a checkpoint fills them."""
    load_weights: Callable[..., None]
    """``(model, folder, grown=names)``: fill the model from a checkpoint folder's safetensors, each rank
    reading only its own slices; a tensor named in ``grown`` fills the first rows of a longer parameter."""
    gather: Callable[[list[torch.nn.Parameter]], AbstractContextManager]
    """A context in which the listed parameters are whole, and rank 0's writes persist."""
    resize_vocabulary: Callable[[PreTrainedModel, int], None]
    """Grow the embedding (and an untied head) to this many rows, the new ones partitioned too."""
    write_rows: Callable[[torch.nn.Parameter, list[int], torch.Tensor], None]
    """Write whole rows at these ids, each rank only the part of them its own partition holds."""
