"""bench/beam_search.py end to end on a small case: it runs both searches, they agree, and its FLOP count (work
each search must do) matches the model's shape; the bench's timings themselves are not asserted."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from transformers import LlamaConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "beam_search.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("beam_search_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_both_searches_and_they_agree(bench, capsys):
    assert bench.main(["--users", "6", "--items", "300", "--codes", "16", "--beams", "6", "--top-k", "3",
                       "--users-per-batch", "4", "--hf-users-per-batch", "3", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ratio: [\d.]+x wall", out)
    assert "identical top-3 sets 100.0%" in out, out
    ours, hf = (float(x.replace(",", "")) for x in re.search(r"ours ([\d,]+) M, hf ([\d,]+) M", out).groups())
    assert 0 < ours < hf


def test_flop_count_of_one_beam_one_level_is_one_forward_pass(bench):
    """With one beam and one level both searches are a single prefill; ours skips the last layer's work after
    keys/values on all but the last prompt token, which is exactly what separates the two counts."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, vocab_size=1000)
    prompt = 10
    flops = bench.matmul_flops_per_user(config, prompt, levels=1, num_beams=1)
    kv = 2 * 64 * 2 * 32
    rest = 2 * (64 * 64 * 2 + 3 * 64 * 128)
    attention = 4 * 64
    head = 2 * 64 * 1000
    assert flops["hf"] == pytest.approx(prompt * 3 * (kv + rest + attention * prompt / 2) + head)
    skipped = (prompt - 1) * rest + attention * (prompt * prompt / 2 - prompt)
    assert flops["hf"] - flops["ours"] == pytest.approx(skipped)
