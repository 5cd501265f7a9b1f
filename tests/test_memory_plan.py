"""`recllm plan`: the packed language-model plan keeps its numbers."""

from __future__ import annotations

import pytest

from launcher.config import load_config
from tests.conftest import REPO
from trainers.memory_plan import plan_memory


@pytest.mark.parametrize("config, new_tokens, expected", [
    ("demo", 0, dict(total_params=1_049_216, base_params=1_049_216, trainable_params=1_049_216,
                     tokens_per_micro_batch=512, weights=4_196_864, gradients=2_098_432, optimizer=6_295_296,
                     activations=20_971_520, logits=25_165_824)),
    ("scientific_smollm2", 1024, dict(total_params=135_104_832, base_params=134_515_008, trainable_params=5_474_304,
                                      tokens_per_micro_batch=1024, weights=540_419_328, gradients=10_948_608,
                                      optimizer=32_845_824, activations=2_689_597_440, logits=616_562_688)),
])
def test_language_model_plans_keep_their_numbers(config, new_tokens, expected):
    """Full fine-tuning (demo) and LoRA with new tokens (SmolLM2): the numbers `recllm plan` printed before
    recipes could bring their own workload."""
    plan = plan_memory(load_config(str(REPO / "configs" / f"{config}.yaml"), []), new_tokens)
    assert {name: getattr(plan, name) for name in expected} == expected
    assert plan.workload is None
