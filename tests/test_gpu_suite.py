"""bench/gpu_suite.py in its CPU smoke mode, so the GPU suite cannot rot between GPU loans: every planned case
has a row, the paths that need no CUDA really train and search (loss of a random model, tokens/s, beam search
identical to HF generate, a DeepSpeed ZeRO-2 step), the FLOP count is the hand count of the tiny shape, and the
CUDA-only paths say why they did not run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the real DeepSpeed step, on CPU

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("gpu_suite")
    assert module.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_suite.json").read_text())
    return result, {row["case"]: row for row in result["rows"]}, (out / "gpu_suite.md").read_text()


def expected_cases() -> list[str]:
    cases = []
    for finetune in ("full", "lora"):
        for attention in ("sdpa", "flex_attention", "flash_attention_2"):
            cases += [f"train tiny {finetune} {attention} ckpt=off", f"train tiny {finetune} {attention} ckpt=on"]
        cases.append(f"train tiny {finetune} sdpa-unpacked ckpt=off")
        if finetune == "full":
            cases += ["train tiny full visibility-sdpa ckpt=off", "train tiny full visibility-flex_attention ckpt=off",
                      "beam tiny", "multinomial tiny"]
    return cases + ["deepspeed zero2 tiny full"]


def test_every_case_has_a_row_in_order_and_in_the_markdown(smoke):
    result, rows, markdown = smoke
    assert [r["case"] for r in result["rows"]] == expected_cases()
    assert result["meta"]["profile"] == "smoke" and result["meta"]["device"].startswith("CPU")
    for name, row in rows.items():
        assert f"| {name} |" in markdown
        assert not row["status"].startswith("error"), (name, row["status"])


def test_training_steps_run_and_cuda_only_paths_say_why_not(smoke):
    _, rows, _ = smoke
    trained = [r for r in rows.values() if r["case"].startswith(("train", "deepspeed")) and r["status"] == "ok"]
    assert {r["case"] for r in trained} >= {"train tiny full sdpa ckpt=on", "train tiny lora sdpa ckpt=off",
                                            "train tiny full visibility-sdpa ckpt=off", "deepspeed zero2 tiny full"}
    vocab = 4096 + 4 * 16  # the tiny tokenizer plus the smoke's 4 x 16 code tokens
    for r in trained:
        assert r["tokens_per_s"] > 0 and r["steps"] == 2
        # A random-init model predicts about uniformly: cross-entropy near ln(vocabulary).
        assert abs(r["loss_first"] - math.log(vocab)) < 1.0 and math.isfinite(r["loss_last"])
        assert r["peak_allocated_gib"] is None and r["mfu"] is None  # no CUDA: not measured, not invented
        assert r["plan_live_gib"] > 0 and r["measured_over_plan"] is None
    for r in rows.values():
        if "flex_attention" in r["case"]:
            assert r["status"] == "unavailable: FlexAttention has no backward pass on the CPU"
    assert rows["deepspeed zero2 tiny full"]["zero_stage"] == 2
    assert rows["train tiny lora sdpa ckpt=off"]["trainable_params"] < rows["train tiny full sdpa ckpt=off"][
        "trainable_params"]


def test_flop_count_is_the_hand_count_of_the_tiny_shape(smoke):
    _, rows, _ = smoke
    hidden, inter, layers, q_dim, kv_dim, vocab = 128, 256, 2, 128, 64, 4096 + 64
    per_layer = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + 3 * hidden * inter
    n = layers * per_layer + hidden * vocab  # 827,392: projections and the (tied) head, not the lookup
    row = rows["train tiny full sdpa ckpt=off"]
    assert row["model_flops_per_token"] == pytest.approx(6 * n + 12 * layers * q_dim * row["mean_context"])
    lora = rows["train tiny lora sdpa ckpt=on"]  # frozen weights (4N) and a second forward (2N + 4 attention)
    assert lora["executed_flops_per_token"] == pytest.approx(6 * n + 16 * layers * q_dim * lora["mean_context"])
    assert 1 < row["mean_context"] < 256 / 2  # packed samples keep each token's context short


def test_beam_search_agrees_with_hf_generate_and_the_heads_score_users(smoke):
    _, rows, _ = smoke
    beam = rows["beam tiny"]
    assert beam["agreement_users"] == 8
    assert beam["agreement_identical_sets"] == 1.0 and beam["agreement_identical_lists"] == 1.0
    assert beam["ours_users_per_s"] > 0 and beam["hf_users_per_s"] > 0
    assert 0 < beam["ours_flops_per_user"] < beam["hf_flops_per_user"]
    multinomial = rows["multinomial tiny"]
    assert multinomial["users_per_s"] > 0 and multinomial["items"] == 64
