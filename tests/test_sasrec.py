"""SASRec: causal masking, padding, checkpoints, no leakage, learning an obvious pattern, determinism.

The dataset is a synthetic LC-Rec file run through the real `recllm prepare` code: every user walks
through consecutive items (i, i+1, i+2, ... mod N), so the next item is always the last one plus one.
"""

import json
import os

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.config_schema import ConfigError
from data_pipeline.prepare import run_prepare
from trainers.baseline import evaluate_sasrec, length_bucketed_batches, read_train_sequences, train_sasrec
from trainers.metrics_logger import read_metrics
from trainers.sasrec import SASRec, histories_to_tokens, load_sasrec, recommend_topk, save_sasrec
from trainers.sasrec_config import SASRecConfig

NUM_ITEMS = 24
NUM_USERS = 160


def _walk(user: int) -> list[int]:
    start, length = (user * 7) % NUM_ITEMS, 5 + user % 6
    return [(start + j) % NUM_ITEMS for j in range(length)]


@pytest.fixture(scope="module")
def walk_dataset(tmp_path_factory) -> str:
    raw = tmp_path_factory.mktemp("raw")
    (raw / "Walk.inter.json").write_text(json.dumps({str(u): _walk(u) for u in range(NUM_USERS)}))
    run_dir = tmp_path_factory.mktemp("run")
    run_prepare(DataConfig(format="lcrec", path=str(raw), name="Walk", num_shards=2), str(run_dir))
    return str(run_dir / "dataset")


def tiny_config(**overrides) -> SASRecConfig:
    base = dict(hidden_size=32, num_blocks=2, num_heads=2, max_len=12, dropout=0.1, lr=5e-3, batch_size=32,
                epochs=40, patience=40, eval_every=5)
    return SASRecConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(walk_dataset):
    return train_sasrec(walk_dataset, tiny_config(), seed=0)


def test_config_reports_every_problem_at_once():
    problems = SASRecConfig(loss="mse", hidden_size=30, num_heads=4, dropout=1.0, device="tpu", lr=0).check()
    assert len(problems) == 5
    assert any(p.startswith("loss:") for p in problems) and any(p.startswith("num_heads:") for p in problems)
    assert any(p.startswith("device:") for p in problems) and any(p.startswith("lr:") for p in problems)
    assert SASRecConfig().check() == []
    assert SASRecConfig(device="cuda:1").check() == []


def test_train_rejects_bad_config(walk_dataset):
    with pytest.raises(ConfigError, match="loss"):
        train_sasrec(walk_dataset, SASRecConfig(loss="hinge"))


def test_train_sequences_stop_before_valid_and_test_targets(walk_dataset):
    sequences = sorted(read_train_sequences(walk_dataset), key=lambda s: s[0] * 100 + len(s))
    expected = sorted((_walk(u)[:-2] for u in range(NUM_USERS)), key=lambda s: s[0] * 100 + len(s))
    assert sequences == expected


def test_causal_mask_hides_later_items():
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, hidden_size=16, num_blocks=2, num_heads=2, max_len=8).eval()
    tokens = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]])
    changed = tokens.clone()
    changed[0, 5] = 20
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])  # the change is visible from its position on


def test_padding_does_not_change_scores():
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, hidden_size=16, num_blocks=2, num_heads=1, max_len=8)
    short, long = [4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8]
    alone = model.score([short])
    batched = model.score([long, short])  # short is now left-padded to width 8
    torch.testing.assert_close(alone[0], batched[1], rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    assert model.training  # score() restores the mode it found


def test_histories_are_cut_to_max_len_and_checked():
    tokens = histories_to_tokens([[0, 1, 2, 3, 4], [7], []], max_len=3, num_items=10)
    assert tokens.tolist() == [[3, 4, 5], [0, 0, 8], [0, 0, 0]]
    with pytest.raises(ValueError, match="outside the catalogue"):
        histories_to_tokens([[1, 10]], max_len=3, num_items=10)


def test_item_embeddings_leave_out_padding(trained):
    model = trained.model
    embeddings = model.item_embeddings()
    assert embeddings.shape == (NUM_ITEMS, 32)
    torch.testing.assert_close(embeddings, model.item_emb.weight[1:])
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0  # the padding row never trains


def test_learns_next_item_pattern(trained, walk_dataset):
    assert trained.valid_metrics["HR@1"] > 0.9
    assert trained.losses[-1] < trained.losses[0] / 2
    test = evaluate_sasrec(trained.model, walk_dataset, "test")
    assert test["HR@1"] > 0.9 and test["NDCG@10"] > 0.9
    assert trained.best_epoch in [h["epoch"] for h in trained.history]


def test_bce_loss_learns_too(walk_dataset):
    result = train_sasrec(walk_dataset, tiny_config(loss="bce", epochs=40), seed=0)
    assert result.valid_metrics["HR@5"] > 0.8


def test_recommend_topk(trained):
    model = trained.model
    histories = [[0, 1, 2, 3], [10, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    ids, scores = recommend_topk(model, histories, k=5, exclude_seen=True, batch_size=2)
    assert ids.shape == scores.shape == (3, 5)
    assert ids[:, 0].tolist() == [4, 12, 14]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    for row, history in zip(ids.tolist(), histories):
        assert not set(row) & set(history)
    # Rows come back in input order although scoring groups them by length.
    direct = torch.topk(model.score(histories), 5, dim=1).indices
    kept_ids, _ = recommend_topk(model, histories, k=5, exclude_seen=False)
    assert torch.equal(kept_ids, direct)


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "sasrec"
    save_sasrec(trained.model, str(path))
    assert sorted(os.listdir(path)) == ["model.safetensors", "sasrec.json"]
    loaded = load_sasrec(str(path))
    histories = [[0, 1, 2], [20, 21, 22, 23, 0]]
    assert torch.equal(loaded.score(histories), trained.model.score(histories))
    assert json.loads((path / "sasrec.json").read_text())["num_items"] == NUM_ITEMS


def test_load_rejects_unknown_format(trained, tmp_path):
    path = tmp_path / "sasrec"
    save_sasrec(trained.model, str(path))
    (path / "sasrec.json").write_text(json.dumps({"format": "other", "num_items": NUM_ITEMS}))
    with pytest.raises(ValueError, match="format"):
        load_sasrec(str(path))


def test_same_seed_same_model_other_seed_different(walk_dataset):
    cfg = tiny_config(epochs=3, eval_every=1)
    first, second = train_sasrec(walk_dataset, cfg, seed=3), train_sasrec(walk_dataset, cfg, seed=3)
    assert first.losses == second.losses
    assert torch.equal(first.model.item_embeddings(), second.model.item_embeddings())
    other = train_sasrec(walk_dataset, cfg, seed=4)
    assert other.losses != first.losses


def test_training_leaves_global_torch_state_alone(walk_dataset):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train_sasrec(walk_dataset, tiny_config(epochs=1, num_threads=1), seed=0)
    torch.testing.assert_close(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_length_bucketed_batches_cover_every_row_once():
    lengths = torch.tensor(np.random.default_rng(0).integers(1, 50, 1000))
    batches = length_bucketed_batches(lengths, 64, torch.Generator().manual_seed(0), pool_batches=4)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    assert all(len(b) <= 64 for b in batches)
    spread = np.mean([int(lengths[b].max() - lengths[b].min()) for b in batches])
    assert spread < 20  # batches group similar lengths (random batches would span ~45)


def test_metrics_logged_per_epoch(walk_dataset, tmp_path):
    result = train_sasrec(walk_dataset, tiny_config(epochs=2, eval_every=1), seed=0, log_dir=str(tmp_path / "tb"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    records = read_metrics(tmp_path / "tb")
    losses = [r["sasrec/train_loss"] for r in records if "sasrec/train_loss" in r]
    assert losses == pytest.approx(result.losses)
    assert [r["step"] for r in records if "sasrec/valid_NDCG@10" in r] == [1, 2]


def test_a_catalogue_smaller_than_the_largest_k_ranks_all_of_it(trained, walk_dataset):
    # 24 items, K up to 50: the top-50 is the whole catalogue, so every target is a hit at 50 (and the
    # model's own top-24 decides NDCG). It raised 'k=50 must be in [1, 24]' and train-baseline crashed.
    metrics = evaluate_sasrec(trained.model, walk_dataset, "valid", exclude_seen=False, ks=(1, 10, 50))
    assert metrics["HR@50"] == 1.0 and metrics["Coverage@50"] > 0
    assert metrics["HR@1"] <= metrics["HR@10"] <= metrics["HR@50"] and metrics["NDCG@50"] >= metrics["NDCG@10"]
