"""`recllm plan`: the packed language-model plan keeps its numbers, and a LoID config is planned as LoID trains
(no new tokens, no logits, the review and prompt positions of a step), with parameter counts equal to those of
the LoIDRegressor the objective builds, before and after build-reviews."""

from __future__ import annotations

import csv
import io

import pytest

from launcher.cli import main
from launcher.config import load_config
from tests.conftest import REPO
from trainers.memory_plan import plan_memory

LOID_YAML = str(REPO / "configs" / "loid_reviews.yaml")


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


@pytest.fixture(scope="module")
def review_run(tmp_path_factory):
    """build-reviews on a slice of both shipped domains: (run_dir, the overrides that point at them)."""
    root = tmp_path_factory.mktemp("plan_reviews")
    src = REPO / "data" / "reviews"
    (root / "mi").mkdir()
    (root / "dm").mkdir()
    rows = list(csv.reader(io.StringIO((src / "musical_instruments" / "Musical_instruments_reviews.csv")
                                       .read_text(encoding="utf-8"))))[:201]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (root / "mi" / "mi.csv").write_text(out.getvalue(), encoding="utf-8")
    dm = (src / "digital_music" / "reviews_Digital_Music_5.head2500.json").read_text(encoding="utf-8")
    (root / "dm" / "dm.json").write_text("\n".join(dm.splitlines()[:150]) + "\n", encoding="utf-8")
    run_dir = root / "run"
    overrides = [f"run_dir={run_dir}", "train.micro_batch_size=4",
                 f"reviews.domains={{digital_music: {root / 'dm'}, musical_instruments: {root / 'mi'}}}"]
    assert main(["build-reviews", LOID_YAML, *overrides]) == 0
    return run_dir, overrides


def _built(cfg, run: str):
    from trainers.loid.objective import LoIDObjective, run_config

    return LoIDObjective.build_model(run_config(cfg, run), {})


def test_loid_plan_counts_the_parameters_of_the_model_it_trains(review_run):
    """Source run, then loid_plugin (its frozen source plugin counted in the weights, not in the trainable)."""
    from data_pipeline.run_layout import RunLayout
    from trainers.loid.objective import LoIDObjective
    from trainers.loid.plugins import save_plugin

    run_dir, overrides = review_run
    cfg = load_config(LOID_YAML, overrides)
    workloads = {w.run: w for w in LoIDObjective.memory_workloads(cfg)}
    assert list(workloads) == ["source_digital_music", "loid", "loid_no_cl", "loid_plugin"]

    built = _built(cfg, "source_digital_music")
    save_plugin(built.model.lm, "digital_music", f"{RunLayout(str(run_dir)).loid('source_digital_music')}/plugin")
    for name in ("source_digital_music", "loid_plugin"):
        model = built.model if name == "source_digital_music" else _built(cfg, name).model
        plan = plan_memory(cfg, 0, workload=workloads[name])
        assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad), name
        assert plan.total_params == sum(p.numel() for p in model.parameters()), name
        assert plan.new_tokens == 0 and plan.logits == 0 and plan.workload.frozen_adapters == (1 if name == "loid_plugin" else 0)
        # positions: k reviews per user and per item at review_tokens each, plus [u, i, two reads, prompt]
        b, k, t = cfg.train.micro_batch_size, cfg.reviews.k, cfg.loid.review_tokens
        assert plan.tokens_per_micro_batch == b * 2 * k * t + b * (4 + len(model.prompt_ids))
    assert workloads["loid_plugin"].added == workloads["loid"].added  # same target domain, same ID rows


def test_loid_plan_before_build_reviews_says_it_assumes_no_ids(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["plan", LOID_YAML, f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("config valid; new tokens: 0;") and "until `recllm build-reviews` (0 assumed)" in out
    assert lines[1].startswith("4 LoID runs, per GPU: source_digital_music ") and "the largest" in lines[1]
    assert lines[2].startswith("model tiny, LoID run loid_plugin: ") and "LoRA r=8 on q_proj" in lines[2]
    assert "user + item ID embeddings, 0 + 0 rows (0)" in lines[2] and "frozen: the LM" in lines[2]
    assert any(line.split()[:4] == ["logits,", "fp32", "copy", "+"] and line.split()[-2] == "0.00" for line in lines)
    assert not run_dir.exists()
