"""Partitioned loading under ZeRO-3 through the real Ray Train + DeepSpeed path: a random Llama 3 checkpoint of
~315 MB (fp32) trains on 2 ranks, and each rank's host memory record shows it never held the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_train_integration import _copy_inputs, _digests, _metrics, _train, prepared  # noqa: F401
from tests.tiny_families import save_tiny_checkpoint

pytestmark = pytest.mark.integration

# hidden 1024, 8 layers, GQA 16/4, untied head over the tiny tokenizer's 4,096 tokens: 78.7M parameters
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=2048)


def test_zero3_ranks_hold_only_their_partition(prepared, tmp_path):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = save_tiny_checkpoint("llama3", tmp_path / "checkpoint", **SHAPE)
    full_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    run_dir = _copy_inputs(prepared, tmp_path / "run")
    out = _train(run_dir, "model.size=auto", f"model.checkpoint={checkpoint}",
                 "train.deepspeed_config=configs/deepspeed/zero3.json", "train.max_steps=3", "train.log_every=1",
                 "train.checkpoint_every=3", "train.seq_len=64", "train.micro_batch_size=2",
                 "train.learning_rate=1e-3")

    records = [json.loads((run_dir / "train" / "memory" / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        rec["build_peak"] = build_peak = rec["after_build"]["peak_rss_bytes"] - rec["before_build"]["rss_bytes"]
        print(f"rank {r}: checkpoint {full_bytes / 2**20:.0f} MiB, model {rec['model_bytes'] / 2**20:.0f} MiB, "
              f"params on host {rec['params_on_host_bytes'] / 2**20:.0f} MiB, build peak +{build_peak / 2**20:.0f} MiB, "
              f"peak RSS {rec['after_wrap']['peak_rss_bytes'] / 2**20:.0f} MiB")
    for rec in records:
        assert rec["model_bytes"] > full_bytes  # the model really is the checkpoint plus the new rows
        assert rec["params_on_host_bytes"] < 0.7 * full_bytes, rec
        assert rec["build_peak"] < 0.7 * full_bytes, rec

    losses = [m["loss"] for m in _metrics(run_dir)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert _digests(run_dir)[0] == _digests(run_dir)[1]
    # each rank read its own slices: the exported weights are the checkpoint's, moved only by 3 small steps,
    # and the new rows are there (a misread slice would differ by about its own norm)
    start = load_file(str(checkpoint / "model.safetensors"))
    exported = dict(AutoModelForCausalLM.from_pretrained(out["model_dir"]).named_parameters())
    for name, tensor in start.items():
        moved = exported[name].detach()[: tensor.shape[0]]
        assert (moved - tensor).norm() < 0.2 * tensor.norm(), name
    new_rows = exported["model.embed_tokens.weight"].shape[0] - start["model.embed_tokens.weight"].shape[0]
    assert new_rows == len(json.loads((run_dir / "item_ids" / "tokens.json").read_text()))
    head = exported["lm_head.weight"].detach()
    assert torch.isfinite(head).all() and (head[4096:] - start["lm_head.weight"].mean(0)).abs().max() < 0.05
