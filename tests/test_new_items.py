"""Items new since training, without retraining (issue #26): after a model is exported, items are added to the
catalogue; prepare and build-ids run again (the pretrained reader reads the new texts), and the nightly `recllm
infer` ranks them from their text: they appear in users' top-K, while every trained item keeps its score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.numpy

from launcher.cli import main
from tests.conftest import DEMO_DATA, REPO

pytestmark = pytest.mark.integration

USERS = 120
NEW_ITEMS = 40


def _slice(folder: Path, extra_items: int = 0) -> dict:
    """The first USERS users of Scientific with only the items they touch; ``extra_items`` more items (real titles
    of items nobody here touched) under ids above every existing one, so old items keep their dense ids."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = json.loads((DEMO_DATA / "Scientific.inter.json").read_text())
    catalogue = json.loads((DEMO_DATA / "Scientific.item.json").read_text())
    users = {u: inter[u] for u in list(inter)[:USERS]}
    used = sorted({i for seq in users.values() for i in seq})
    items = {str(i): catalogue[str(i)] for i in used}
    unused = [k for k in catalogue if int(k) not in set(used)][:extra_items]
    for n, source in enumerate(unused):
        items[str(100000 + n)] = catalogue[source]
    (folder / "Scientific.inter.json").write_text(json.dumps(users))
    (folder / "Scientific.item.json").write_text(json.dumps(items))
    return items


def _args(run_dir: Path, raw: Path) -> list[str]:
    return [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", f"data.path={raw}", "data.num_shards=2",
            "ids.scheme=atomic", "model.new_token_init=mean", "text.vectors=true", "text.layer=2",
            "text.max_tokens=16", "infer.mode=nightly", "infer.text_weight=2.0", "infer.text_untrained_bias=1.0", "infer.users_per_shard=64",
            "infer.num_replicas=1", "infer.top_k=10"]


def _export_model(run_dir: Path) -> None:
    """A tiny LLaMA with the run's item tokens, saved as `recllm train` exports it."""
    from launcher.config import load_config
    from trainers.models import build_model

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["model.new_token_init=mean"])
    tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    model, tokenizer = build_model(cfg.model, tokens, seed=1)
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    (run_dir / "model" / "recllm_model.json").write_text(json.dumps({"step": 0}))


def _lists(run_dir: Path) -> dict[int, dict[int, float]]:
    table = pq.read_table(run_dir / "topk").to_pylist()
    return {r["user_id"]: dict(zip(r["item_ids"], r["scores"])) for r in table}


def test_items_added_after_training_are_ranked_from_text_and_trained_scores_stay(tmp_path, ray_local):
    raw, run_dir = tmp_path / "raw", tmp_path / "run"
    old_items = _slice(raw)
    for stage in ("prepare", "build-ids"):
        assert main([stage, *_args(run_dir, raw)]) == 0
    _export_model(run_dir)
    old_vectors = safetensors.numpy.load_file(str(run_dir / "item_ids" / "text_vectors.safetensors"))["text_vectors"]
    assert main(["infer", *_args(run_dir, raw)]) == 0
    before = _lists(run_dir)
    assert all(i < len(old_items) for scores in before.values() for i in scores)

    _slice(raw, extra_items=NEW_ITEMS)  # the catalogue grows overnight; nobody has interacted with the new items
    for stage in ("prepare", "build-ids"):
        assert main([stage, *_args(run_dir, raw)]) == 0
    vectors = safetensors.numpy.load_file(str(run_dir / "item_ids" / "text_vectors.safetensors"))["text_vectors"]
    assert vectors.shape[0] == len(old_items) + NEW_ITEMS
    assert np.allclose(vectors[:len(old_items)], old_vectors, atol=1e-5)  # the whitening is the trained items'
    assert np.abs(vectors[len(old_items):]).sum(1).min() > 0  # every new item has a row from its text
    assert main(["infer", *_args(run_dir, raw)]) == 0  # the model was not retrained: it lacks the new tokens
    after = _lists(run_dir)
    success = json.loads((run_dir / "topk" / "_SUCCESS").read_text())
    assert success["users_scored"] == USERS  # the grown catalogue reuses no row scored before it

    new_in_lists = {i for scores in after.values() for i in scores if i >= len(old_items)}
    assert new_in_lists, "no item added since training reached any top-K"
    shared = [(before[u][i], after[u][i]) for u in before for i in before[u] if i in after[u]]
    assert len(shared) > USERS  # most trained items stay in the lists, with the very same scores
    assert np.allclose(*zip(*shared), atol=1e-4)
