"""The recipe configs through the real Ray Train + DeepSpeed path (2 gloo workers, tiny LLaMA, shipped
Scientific slice): ControlRec's contrastive terms and visibility mask, and CLLM4Rec's restricted softmaxes,
mutual regularization and multinomial-head top-K, end to end for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from launcher.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.integration

SHORT = ["train.max_steps=16", "train.seq_len=128", "train.micro_batch_size=4", "train.log_every=4",
         "train.checkpoint_every=0", "train.warmup_steps=2", "samples.max_samples_per_task=400"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "logs" / "metrics.jsonl").read_text().splitlines()]


def _digests(run_dir: Path) -> list[str]:
    return [(run_dir / "train" / "param_digest" / f"rank-{r}.txt").read_text() for r in range(2)]


def test_controlrec_recipe_trains_with_every_component(tmp_path, ray_local):
    config = str(REPO / "configs" / "controlrec_scientific.yaml")
    args = [f"run_dir={tmp_path}", *SHORT, "train.controlrec.hfm=true", "train.controlrec.icl=true",
            "train.controlrec.hfm_negatives=3", "train.controlrec.icl_anchors=4", "train.eval_every=8",
            "train.eval_users=100", "train.patience=0", "baseline.hidden_size=16", "baseline.epochs=2"]
    for stage in ("prepare", "train-baseline", "build-ids", "build-samples", "train"):
        assert main([stage, config, *args]) == 0
    names = pq.read_table(tmp_path / "item_ids" / "item_codes.parquet").column("text").to_pylist()
    numbers = [int(name.removeprefix("item_")) for name in names]
    assert sorted(numbers) == list(range(1000, 1000 + len(numbers)))  # collaborative: one run of 4-digit numbers
    rounds = [m for m in _metrics(tmp_path) if "valid/NDCG@10" in m]
    assert [m["step"] for m in rounds] == [8, 16]  # the sub-token trie's beam search on valid users
    logs = [m for m in _metrics(tmp_path) if "loss" in m]
    weights = [m["objective/icl_weight"] for m in logs]
    assert weights == sorted(weights) and weights[0] < weights[-1] <= 1.0  # lambda_t grows over the run
    for key in ("objective/hfm/item_description", "objective/hfm/sequence_prediction", "objective/icl"):
        assert all(m[key] > 0 for m in logs), key
    assert logs[-1]["loss/user_sequence"] < logs[0]["loss/user_sequence"]  # sequence-level: every item's pieces
    a, b = _digests(tmp_path)
    assert a == b  # the replicas stayed in sync through the extra forward passes


def test_cllm4rec_recipe_trains_and_scores_with_the_multinomial_head(tmp_path, ray_local):
    config = str(REPO / "configs" / "cllm4rec_scientific.yaml")
    args = [f"run_dir={tmp_path}", *SHORT, "eval.baseline=false", "infer.users_per_shard=100000",
            "model.new_token_init=mean", "train.eval_every=8", "train.eval_users=200"]  # no baseline to init from
    for stage in ("prepare", "build-ids", "build-samples", "train", "infer", "evaluate"):
        assert main([stage, config, *args]) == 0
    tokens = json.loads((tmp_path / "item_ids" / "tokens.json").read_text())
    assert "<text_item_0>" in tokens and "<text_user_0>" in tokens
    logs = _metrics(tmp_path)
    for key in ("loss/user_sequence", "loss/collaborative_lm", "loss/content_lm", "objective/mutual_regularization"):
        assert all(key in m for m in logs), key
    assert logs[-1]["loss/collaborative_lm"] < logs[0]["loss/collaborative_lm"]
    # Item-only softmax over 4,344 items starts near log(4344) = 8.38, far below a full-vocabulary loss.
    assert logs[0]["loss/user_sequence"] < 8.5
    # validated with the multinomial head on valid users, best round exported
    assert json.loads((tmp_path / "model" / "recllm_model.json").read_text())["step"] in (8, 16)
    topk = pq.read_table(tmp_path / "topk").to_pylist()
    assert len(topk) == 8317 and all(len(r["item_ids"]) == 20 for r in topk)
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["infer"]["scorer"] == "multinomial" and report["models"]["recllm"]["invalid_item_rate"] == 0.0


class MeanSquaredLogitObjective:
    """A toy objective registered from this test file only: it pulls every logit of the labelled positions
    towards zero. Nothing in the project names it."""

    uses_entities = False

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    @classmethod
    def build(cls, ctx):
        return cls(len(ctx.tasks))

    @staticmethod
    def check(root):
        return []

    def loss(self, model, batch, step, device):
        import numpy as np

        out = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False)
        mask = (batch.labels.to(device) != -100).unsqueeze(-1)
        loss = (out.logits.float() ** 2 * mask).sum() / mask.sum().clamp(min=1) / out.logits.shape[-1]
        return loss, np.zeros((self.num_tasks, 2)), {"toy": loss.item()}


def test_an_objective_registered_in_a_test_file_trains_through_ray_and_deepspeed(tmp_path, ray_local):
    import sys

    from ray import cloudpickle

    from trainers.recipes.registry import OBJECTIVES, register_objective

    # This test module is not importable on the workers: ship the class by value, as a user's notebook would.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register_objective("toy_mean_squared_logit")(MeanSquaredLogitObjective)
    try:
        run_dir = tmp_path / "run"
        args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", "samples.max_samples_per_task=200",
                "train.objective=toy_mean_squared_logit", "train.max_steps=5", "train.log_every=1",
                "train.checkpoint_every=5", "train.eval_every=0", "train.learning_rate=1e-3", "train.warmup_steps=0",
                "model.new_token_init=mean",  # no baseline stage here: the objective's plumbing is under test
                "text.vectors=false"]
        for stage in ("prepare", "build-ids", "build-samples", "train"):
            assert main([stage, *args]) == 0
    finally:
        OBJECTIVES.pop("toy_mean_squared_logit")
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    logs = [json.loads(line) for line in (run_dir / "train" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    assert logs[-1]["objective/toy"] < logs[0]["objective/toy"]  # the toy loss is what was optimised
