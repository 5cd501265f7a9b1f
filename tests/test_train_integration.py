"""`recllm train` on CPU with the real Ray Train + DeepSpeed (2 gloo workers, tiny LLaMA, shipped data):
loss falls, replicas agree, and a worker killed mid-run resumes exactly from the last checkpoint; a tiny
checkpoint of each family (Llama 3, Qwen2, Qwen3, Mistral) trains a few steps and exports."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from launcher.cli import main
from launcher.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.integration

BASE = ["train.max_steps=40", "train.seq_len=128", "train.micro_batch_size=4", "train.log_every=5",
        "train.checkpoint_every=10", "train.learning_rate=3e-3", "train.warmup_steps=2", "samples.max_samples_per_task=300"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    run_dir = tmp_path_factory.mktemp("train_run")
    args = [f"run_dir={run_dir}", "ids.scheme=precomputed", *BASE]
    for stage in ("prepare", "build-ids", "build-samples"):
        assert main([stage, str(REPO / "configs" / "alignment_sft.yaml"), *args]) == 0
    return run_dir


def _copy_inputs(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("dataset", "item_ids", "samples"):
        shutil.copytree(src / name, dst / name)
    return dst


def _train(run_dir: Path, *extra: str) -> dict:
    from trainers.ray_launch import run_training

    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), [f"run_dir={run_dir}", "ids.scheme=precomputed", *BASE, *extra])
    return run_training(cfg)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "logs" / "metrics.jsonl").read_text().splitlines()]


def _digests(run_dir: Path) -> list[str]:
    return [(run_dir / "train" / "param_digest" / f"rank-{r}.txt").read_text() for r in range(2)]


def _seen(run_dir: Path, rank: int) -> dict[int, list[int]]:
    """step -> sample_ids; a step logged twice (redone after a restart) keeps its last record."""
    steps = {}
    for line in (run_dir / "train" / "samples_seen" / f"rank-{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["sample_ids"]
    return steps


@pytest.fixture(scope="module")
def zero2_run(prepared, tmp_path_factory):
    run_dir = _copy_inputs(prepared, tmp_path_factory.mktemp("z2") / "run")
    out = _train(run_dir, "train.deepspeed_config=configs/deepspeed/zero2.json")
    return run_dir, out


def test_zero2_loss_falls_and_replicas_agree(zero2_run):
    run_dir, out = zero2_run
    m = _metrics(run_dir)
    assert [r["step"] for r in m][-1] == 40
    assert m[-1]["loss"] < m[0]["loss"] - 1.0, [r["loss"] for r in m]
    assert all(0.85 <= r["packing_efficiency"] <= 1.0 for r in m)  # short rows (128) here; bench measures at 512
    d = _digests(run_dir)
    assert d[0] == d[1]
    # the exported model is a plain HF folder with the new tokens in its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(out["model_dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    new_tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    assert len(tok.tokenize(new_tokens[5])) == 1
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tok)
    assert json.loads((model_dir / "recllm_model.json").read_text())["step"] == 40
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in model_dir.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes  # the umask's mode, model.safetensors included


def test_a_fresh_run_starts_over_in_a_run_dir_with_an_earlier_runs_checkpoints(zero2_run, tmp_path):
    """Without train.resume, a run in a run_dir that holds another run's checkpoints (a re-run after a config
    change) trains from step 0: Ray Train would otherwise restore the earlier run's latest checkpoint (step 40
    here) and export it as this run's model."""
    base_dir, _ = zero2_run
    run_dir = _copy_inputs(base_dir, tmp_path / "run")
    shutil.copytree(base_dir / "train" / "ray", run_dir / "train" / "ray")
    out = _train(run_dir, "train.deepspeed_config=configs/deepspeed/zero2.json", "train.max_steps=10")
    assert json.loads((Path(out["model_dir"]) / "recllm_model.json").read_text())["step"] == 10
    assert sorted(_seen(run_dir, 0)) == list(range(1, 11))


def test_zero3_loss_falls_and_replicas_agree(prepared, tmp_path):
    run_dir = _copy_inputs(prepared, tmp_path / "run")
    _train(run_dir, "train.deepspeed_config=configs/deepspeed/zero3.json", "train.max_steps=30")
    m = _metrics(run_dir)
    assert m[-1]["step"] == 30 and m[-1]["loss"] < m[0]["loss"] - 0.8, [r["loss"] for r in m]
    d = _digests(run_dir)
    assert d[0] == d[1]


def test_killed_worker_resumes_exactly(zero2_run, tmp_path, monkeypatch):
    base_dir, _ = zero2_run
    run_dir = _copy_inputs(base_dir, tmp_path / "run")
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv("RECLLM_FAULT_AT_STEP", "23")
    monkeypatch.setenv("RECLLM_FAULT_MARKER", str(marker))
    out = _train(run_dir, "train.deepspeed_config=configs/deepspeed/zero2.json", "train.max_failures=1")
    assert marker.exists(), "the fault was never injected"
    assert json.loads((Path(out["model_dir"]) / "recllm_model.json").read_text())["step"] == 40
    for rank in range(2):
        base, resumed = _seen(base_dir, rank), _seen(run_dir, rank)
        assert sorted(resumed) == list(range(1, 41))
        assert resumed == base  # every step trained on exactly the samples of the uninterrupted run
        ids = [i for step in sorted(resumed) for i in resumed[step]]
        assert len(ids) == len(set(ids))  # within the epoch, no sample twice
    # the restarted run redid steps 21..23 from the step-20 checkpoint
    lines = (run_dir / "train" / "samples_seen" / "rank-0.jsonl").read_text().splitlines()
    assert len(lines) > 40
    assert _digests(run_dir) == _digests(base_dir)  # exact resume: the same final weights


def test_lora_trains_only_adapters_and_new_token_rows(prepared, tmp_path):
    """LoRA via peft: base weights stay frozen, new-token rows and adapters move, the export is merged."""
    from safetensors.torch import load_file

    run_dir = _copy_inputs(prepared, tmp_path / "run")
    out = _train(run_dir, "train.finetune=lora", "train.max_steps=12", "train.checkpoint_every=12",
                 "train.lora_r=4", "train.lora_alpha=8")
    ckpt = sorted(p for p in (run_dir / "train" / "ray" / "sft").glob("checkpoint_*") if p.is_dir())[-1]
    saved = load_file(str(ckpt / "model" / "weights.safetensors"))
    assert saved and all("lora_" in k or "trainable_tokens" in k for k in saved), sorted(saved)[:5]
    assert any("trainable_tokens" in k for k in saved)
    # the merged export differs from the untrained base exactly in the trained parts
    from launcher.config import load_config
    from trainers.models import build_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), [f"run_dir={run_dir}"])
    tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    base, tok = build_model(cfg.model, tokens, seed=cfg.seed)
    merged = AutoModelForCausalLM.from_pretrained(out["model_dir"])
    b, m = dict(base.named_parameters()), dict(merged.named_parameters())
    new_ids = tok.convert_tokens_to_ids(tokens)
    emb_b, emb_m = b["model.embed_tokens.weight"], m["model.embed_tokens.weight"]
    old_rows = [i for i in range(emb_b.shape[0]) if i not in set(new_ids)]
    assert (emb_b[old_rows] == emb_m[old_rows]).all()  # base vocabulary untouched
    assert not (emb_b[new_ids] == emb_m[new_ids]).all()  # new-token rows trained
    assert not (b["model.layers.0.self_attn.q_proj.weight"] == m["model.layers.0.self_attn.q_proj.weight"]).all()
    assert (b["model.norm.weight"] == m["model.norm.weight"]).all()  # not a LoRA target, frozen


# One short run per family's tiny checkpoint (size auto): the untied families under ZeRO-3, Qwen2 with LoRA.
FAMILY_RUNS = [("llama3", "zero3", "full"), ("qwen2", "zero2", "lora"), ("qwen3", "zero3", "full"),
               ("mistral", "zero2", "full")]


@pytest.mark.parametrize("family, zero, finetune", FAMILY_RUNS)
def test_each_family_checkpoint_trains_and_exports(family, zero, finetune, prepared, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_families import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(family, tmp_path / "checkpoint")
    run_dir = _copy_inputs(prepared, tmp_path / "run")
    out = _train(run_dir, "model.size=auto", f"model.checkpoint={checkpoint}", f"train.finetune={finetune}",
                 f"train.deepspeed_config=configs/deepspeed/{zero}.json", "train.max_steps=4", "train.log_every=1",
                 "train.checkpoint_every=4", "train.learning_rate=1e-2", "train.lora_r=4", "train.lora_alpha=8")
    losses = [r["loss"] for r in _metrics(run_dir)]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert _digests(run_dir)[0] == _digests(run_dir)[1]
    model_dir = Path(out["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == type(AutoModelForCausalLM.from_pretrained(checkpoint)).__name__
    new_tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    new_ids = tok.convert_tokens_to_ids(new_tokens)
    assert new_ids == list(range(4096, 4096 + len(new_tokens))) and model.config.vocab_size == len(tok)
    start = load_file(str(checkpoint / "model.safetensors"))
    embed = model.get_input_embeddings().weight.detach()
    assert torch.equal(embed[:4096], start["model.embed_tokens.weight"]) == (finetune == "lora")  # LoRA: base frozen
    mean = start["model.embed_tokens.weight"].mean(dim=0)
    assert (embed[new_ids] - mean).abs().max() > 1e-2  # new rows trained away from their mean init
    if not model.config.tie_word_embeddings:
        head = model.get_output_embeddings().weight.detach()
        assert (head[new_ids] - start["lm_head.weight"].mean(dim=0)).abs().max() > 1e-2
