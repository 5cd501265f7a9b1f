"""The nightly job's capacity plan (issue #29): rates from the measured table, scaled by FLOPs where the shape
differs and said so, GPU-hours and wall time from them, memory per replica, and `recllm plan` printing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.capacity_plan import RATES_FILE, Workload, measured_rates, plan_infer, rate, replica_bytes
from launcher.cli import main
from launcher.config import load_config
from ranking.search_flops import beam_search_flops
from trainers import models

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"smollm2_135m": models.SMOLLM2_135M, "llama2_7b": models.LLAMA2_7B}


def _shape(name):
    return SHAPES[name].llama_config()


def _row(model, scorer):
    return next(r for r in measured_rates()["rows"] if r["model"] == model and r["scorer"] == scorer)


def _workload(row, **changes):
    values = dict(scorer=row["scorer"], beams=row.get("beams", 1), levels=row.get("levels", 1), items=row["items"],
                  new_tokens=row["new_tokens"], prompt_tokens=row["prompt_tokens"],
                  users_per_batch=row["users_per_batch"])
    return Workload(**{**values, **changes})


def test_the_table_names_its_device_date_and_source_and_its_flops_match_the_suites_record():
    table = json.loads(RATES_FILE.read_text())
    assert "H100" in table["device"] and table["date"] == "2026-11-24" and "gpu_suite.json" in table["source"]
    suite = json.loads((REPO / "bench" / "results" / "h100_2026-11-24" / "gpu_suite.json").read_text())["rows"]
    recorded = next(r for r in suite if r["case"] == "beam llama2_7b")
    row = _row("llama2_7b", "beam")
    assert row["users_per_s"] == pytest.approx(recorded["ours_users_per_s"], rel=1e-3)
    config = _shape("llama2_7b")
    config.vocab_size += row["new_tokens"]
    flops = beam_search_flops(config, recorded["prompt_tokens_mean"], row["levels"], row["beams"])["ours"]
    assert flops == pytest.approx(recorded["ours_flops_per_user"], rel=1e-9)


def test_a_measured_workload_gets_its_measured_rate_and_another_is_scaled_by_flops():
    table, row = measured_rates(), _row("llama2_7b", "beam")
    users_per_s, basis = rate("llama2_7b", _shape("llama2_7b"), _workload(row), table, _shape)
    assert users_per_s == row["users_per_s"] and basis.startswith("measured")
    wider = _workload(row, beams=40)  # twice the beams: the decode steps' FLOPs double, the prefill's do not
    scaled, basis = rate("llama2_7b", _shape("llama2_7b"), wider, table, _shape)
    config = _shape("llama2_7b")
    ratio = _workload(row).flops_per_user(config) / wider.flops_per_user(config)
    assert scaled == pytest.approx(row["users_per_s"] * ratio) and 0.5 < ratio < 1 and "scaled by FLOPs" in basis


def test_a_model_smaller_than_any_measured_one_keeps_the_smallest_measured_rate():
    table, row = measured_rates(), _row("smollm2_135m", "multinomial")
    tiny = models.LlamaShape(128, 2, 4, 2, 256, 4096, 1024, True).llama_config()
    users_per_s, basis = rate("tiny", tiny, _workload(row), table, _shape)
    assert users_per_s == row["users_per_s"] and "launch-bound" in basis


def test_the_night_costs_users_over_rate_and_divides_by_gpus():
    cfg = load_config(None, ["stages=[infer]", "infer.scorer=beam", "ids.scheme=semantic", "infer.num_beams=20",
                             "infer.plan_users=1000000", "infer.plan_gpus=4"])
    plan = plan_infer(cfg, "llama2_7b", _shape("llama2_7b"), 100_000, cfg.ids.levels * cfg.ids.codes)
    assert plan.gpu_hours == pytest.approx(1_000_000 / plan.users_per_s / 3600)
    assert plan.wall_hours == pytest.approx(plan.gpu_hours / 4)
    assert 20 < plan.users_per_s < 200  # 7B beam 20: the measured 58 users/s, scaled to this prompt length
    lines = plan.lines()
    assert "beam 20 over 4 code level(s)" in lines[0] and "1,000,000 users" in lines[3] and "4 GPU(s)" in lines[3]


def test_memory_counts_one_prompt_cache_per_user_and_the_item_rows():
    row = _row("llama2_7b", "beam")
    config = _shape("llama2_7b")
    small, large = (replica_bytes(config, _workload(row, beams=b), tied=False) for b in (10, 20))
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * 128 * 2  # bf16 keys and values
    assert large["kv cache"] - small["kv cache"] == pytest.approx(row["users_per_batch"] * 10 * 4 * per_token)
    atomic = replica_bytes(config, _workload(_row("llama2_7b", "multinomial"), new_tokens=1_000_000), tied=False)
    assert atomic["weights"] - small["weights"] > 2 * 2 * 4096 * (1_000_000 - 2048)  # embedding + head rows, bf16


def test_recllm_plan_prints_the_nightly_capacity(capsys, tmp_path):
    assert main(["plan", str(REPO / "configs" / "demo.yaml"), f"run_dir={tmp_path / 'run'}",
                 "infer.plan_users=5000000", "infer.plan_gpus=2", "infer.plan_items=20000"]) == 0
    out = capsys.readouterr().out
    assert "nightly infer on NVIDIA H100" in out and "multinomial head, 20,000 items" in out
    assert "5,000,000 users" in out and "on 2 GPU(s)" in out and "users/s per GPU (" in out
