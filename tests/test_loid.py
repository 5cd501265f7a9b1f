"""LoID: the losses on hand-checked numbers, gradients only where they belong, frozen plugins stay frozen,
a merged plugin reproduces the stacked ones, and the k-review histories never leak the target review."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.errors import DataError
from data_pipeline.reviews.build_reviews import build_review_table
from data_pipeline.reviews.config import ReviewsConfig
from trainers.loid.losses import attend_all, in_batch_triplet_loss, rating_mse
from trainers.loid.plugins import attach_plugins, lora_config, save_plugin
from trainers.model_config import ModelConfig
from trainers.models import build_model

TARGETS = ["q_proj", "v_proj", "up_proj"]


# ----------------------------------------------------------------------------------------------- losses

def test_rating_mse_by_hand():
    assert rating_mse(torch.tensor([3.0, 5.0, 4.5]), torch.tensor([4.0, 4.0, 4.5])).item() == pytest.approx(2 / 3)


def test_attention_by_hand():
    # q = (1, 0), d = 2: scores q.k / sqrt(2) = ln 3 and 0 -> weights 3/4, 1/4 -> 3/4 (4, 0) + 1/4 (0, 8) = (3, 2).
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[math.sqrt(2) * math.log(3), 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    values = torch.tensor([[[4.0, 0.0], [0.0, 8.0]], [[5.0, 5.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True], [False, False]])  # the second set has no review
    out = attend_all(q, keys, values, mask)
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(out[0, 1], torch.zeros(2))


def test_triplet_loss_by_hand():
    # anchor 0 at (0,0): positive (1,0) at 1, negative (0,2) at 2 -> max(0, 1 - 2 + 0.5) = 0
    # anchor 1 at (1,0): positive (1,1) at 1, negative (1,0.5) at 0.5 -> max(0, 1 - 0.5 + 0.5) = 1
    anchors = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    cand = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.5], [1.0, 1.0]]])
    none = torch.zeros(2, 2, dtype=torch.bool)
    usable = torch.ones(2, dtype=torch.bool)
    assert in_batch_triplet_loss(anchors, cand, none, usable, 0.5).item() == pytest.approx(0.5)
    # the same numbers from torch's reference (which adds eps=1e-6 inside the norm)
    ref = F.triplet_margin_loss(anchors, torch.stack([cand[0, 0], cand[1, 1]]), torch.stack([cand[0, 1], cand[1, 0]]),
                                margin=0.5)
    assert ref.item() == pytest.approx(0.5, abs=1e-5)
    # a negative that is the positive's own item is not a negative: only anchor 0's term (0) is left
    same = torch.tensor([[False, False], [True, False]])
    assert in_batch_triplet_loss(anchors, cand, same, usable, 0.5).item() == pytest.approx(0.0)
    # a candidate without reviews is neither a positive nor a negative
    assert in_batch_triplet_loss(anchors, cand, none, torch.tensor([True, False]), 0.5).item() == 0.0


def _tiny_batch():
    from trainers.loid.batches import ReviewBatch

    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]])
    return ReviewBatch(user_ids=torch.tensor([0, 1, 2]), item_ids=torch.tensor([0, 1, 1]),
                       ratings=torch.tensor([5.0, 3.0, 4.0]), review_tokens=tokens, review_mask=tokens > 0,
                       user_history=torch.tensor([[0, -1], [1, 2], [-1, -1]]),
                       item_history=torch.tensor([[2, -1], [0, 1], [0, 1]]))


def _loid(lm, tokenizer, cl_weight=0.5):
    from trainers.loid.model import LoIDRegressor

    return LoIDRegressor(lm, tokenizer, num_users=3, num_items=2, cl_weight=cl_weight, margin=0.5, rating_mean=4.0)


def test_total_loss_is_rec_plus_lambda_cl():
    lm, tok = build_model(ModelConfig(), [], seed=0)
    model = _loid(attach_plugins(lm, "target", lora_config(4, 8, TARGETS)), tok, cl_weight=0.5)
    out = model(_tiny_batch())
    assert out["l_cl"].item() > 0
    assert out["loss"].item() == pytest.approx(out["l_rec"].item() + 0.5 * out["l_cl"].item(), rel=1e-6)
    # the head starts at the train mean: predictions 4 -> L_rec = (1 + 1 + 0) / 3
    assert out["l_rec"].item() == pytest.approx(2 / 3, abs=1e-6)
    no_cl = _loid(model.lm, tok, cl_weight=0.0)(_tiny_batch())
    assert no_cl["loss"].item() == no_cl["l_rec"].item()


# ------------------------------------------------------------------------------------------------ plugins

def _random_plugin(name, out_dir, seed):
    """A saved plugin with non-zero weights (init_lora_weights=False randomises B too)."""
    lm, _ = build_model(ModelConfig(), [], seed=0)
    cfg = lora_config(4, 8, TARGETS)
    cfg.init_lora_weights = False
    torch.manual_seed(seed)
    peft_model = attach_plugins(lm, name, cfg)
    return save_plugin(peft_model, name, out_dir)


@pytest.fixture(scope="module")
def two_plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    return {"music": _random_plugin("music", root, 1), "books": _random_plugin("books", root, 2)}


def test_only_target_lora_and_domain_parts_get_gradients(two_plugins):
    lm, tok = build_model(ModelConfig(), [], seed=0)
    model = _loid(attach_plugins(lm, "target", lora_config(4, 8, TARGETS), two_plugins), tok)
    model(_tiny_batch())["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("lm.") and ".target." not in name:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B.target" in n)
    assert grads["user_emb.weight"].abs().sum() > 0 and grads["key.weight"].abs().sum() > 0


def test_frozen_base_and_source_plugins_do_not_change(two_plugins):
    lm, tok = build_model(ModelConfig(), [], seed=0)
    model = _loid(attach_plugins(lm, "target", lora_config(4, 8, TARGETS), two_plugins), tok)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    target = {n: p.detach().clone() for n, p in model.named_parameters() if ".target." in n}
    assert any(".music." in n for n in frozen) and any(".books." in n for n in frozen)
    assert any("embed_tokens" in n for n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(_tiny_batch())["loss"].backward()
        opt.step()
    after = dict(model.named_parameters())
    changed = [n for n, p in frozen.items() if not torch.equal(p, after[n])]
    assert not changed, changed[:3]
    assert any(not torch.equal(p, after[n]) for n, p in target.items())


def test_merged_plugin_reproduces_stacked_outputs(two_plugins):
    ids = torch.tensor([[1, 50, 300, 7, 99, 1000, 2]])

    def build(merge: bool):
        lm, _ = build_model(ModelConfig(), [], seed=0)
        cfg = lora_config(4, 8, TARGETS)
        cfg.init_lora_weights = False  # a non-zero target adapter (copied below so both builds share it)
        return attach_plugins(lm, "target", cfg, two_plugins, merge=merge).eval()

    def hidden(model):
        with torch.no_grad():
            return model.get_base_model().model(input_ids=ids).last_hidden_state

    stacked_model, merged_model = build(False), build(True)
    assert set(stacked_model.peft_config) == {"music", "books", "target"}
    assert set(merged_model.peft_config) == {"merged_sources", "target"}
    assert merged_model.peft_config["merged_sources"].r == 8  # cat: ranks add up
    target = {n: p for n, p in stacked_model.named_parameters() if ".target." in n}
    with torch.no_grad():
        for n, p in merged_model.named_parameters():
            if ".target." in n:
                p.copy_(target[n])
    torch.testing.assert_close(hidden(merged_model), hidden(stacked_model), atol=1e-5, rtol=1e-5)
    lm, _ = build_model(ModelConfig(), [], seed=0)
    with torch.no_grad():
        base = lm.model(input_ids=ids).last_hidden_state
    assert (base - hidden(stacked_model)).abs().max() > 1e-3  # the plugins do change the output


# ------------------------------------------------------------------------------------ split and histories

def _interactions(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    frame["position"] = frame.sort_values("timestamp", kind="stable").groupby("user_id").cumcount()
    frame["review"] = [f"review {n}" for n in range(len(frame))]
    frame["summary"] = None
    return frame


def test_split_is_leave_last_out_and_histories_never_hold_the_target():
    rows = [(0, 0, 1, 5), (0, 1, 2, 4), (0, 2, 3, 3), (0, 3, 4, 2),  # user 0: 4 reviews
            (1, 0, 1, 1), (1, 2, 5, 2), (1, 1, 6, 3),               # user 1: 3 reviews
            (2, 3, 7, 4), (2, 0, 8, 5)]                             # user 2: 2 -> train only
    table = build_review_table(_interactions(rows), ReviewsConfig(k=2), "toy").to_pandas()
    split = dict(zip(table.review_id, table.split))
    assert [split[i] for i in range(9)] == ["train", "train", "valid", "test", "train", "valid", "test", "train",
                                            "train"]
    review = table.set_index("review_id")
    for _, r in table.iterrows():
        assert r.review_id not in r.user_history and r.review_id not in r.item_history
        for h in r.user_history:
            assert review.loc[h, "split"] == "train" and review.loc[h, "user_id"] == r.user_id
        for h in r.item_history:
            assert review.loc[h, "split"] == "train" and review.loc[h, "item_id"] == r.item_id
    # item 0 has train reviews 0 (t=1), 4 (t=1), 8 (t=8): newest first, at most k=2, never the review itself
    assert list(review.loc[3, "item_history"]) == [7]                # item 3: the other user's train review
    assert list(review.loc[0, "item_history"]) == [8, 4]
    assert list(review.loc[8, "item_history"]) == [4, 0]
    assert list(review.loc[3, "user_history"]) == [1, 0]             # the test review sees train reviews only


def test_shipped_target_domain_has_no_leakage():
    from data_pipeline.canonical import build_canonical
    from data_pipeline.config import DataConfig
    from data_pipeline.importers import import_raw
    from tests.conftest import REPO

    cfg = DataConfig(format="amazon_reviews", path=str(REPO / "data" / "reviews" / "musical_instruments"))
    table = build_review_table(build_canonical(import_raw(cfg), cfg).interactions.to_pandas(), ReviewsConfig(),
                               "mi").to_pandas()
    assert len(table) == 5050 and set(table.split) == {"train", "valid", "test"}
    train_ids = set(table.review_id[table.split == "train"])
    for _, r in table.iterrows():
        hist = set(r.user_history) | set(r.item_history)
        assert r.review_id not in hist and hist <= train_ids and len(r.user_history) <= 5
    last = table.sort_values("timestamp").groupby("user_id").tail(1)
    tested = table[table.split == "test"]
    assert set(tested.user_id) <= set(last.user_id)
    assert (table[table.split == "test"].groupby("user_id").size() == 1).all()


def test_null_rating_is_a_data_error_naming_the_field():
    frame = _interactions([(0, 0, 1, 5), (0, 1, 2, 4)])
    frame.loc[1, "rating"] = np.nan
    with pytest.raises(DataError, match="field 'rating'"):
        build_review_table(frame, ReviewsConfig(), "toy")


def test_bad_domain_file_exits_2_and_writes_nothing(tmp_path, capsys):
    from launcher.cli import main
    from tests.conftest import REPO

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "r.csv").write_text("reviewerID,asin,overall,unixReviewTime,reviewText,summary\n"
                                "u1,i1,5,10,nice,ok\nu1,i2,4,11,fine,ok\n")
    (bad / "r.csv").write_text("reviewerID,asin,overall,unixReviewTime,reviewText,summary\n"
                               "u1,i1,5,10,nice,ok\nu2,i1,seven,11,fine,ok\n")
    run_dir = tmp_path / "run"
    rc = main(["build-reviews", str(REPO / "configs" / "loid_reviews.yaml"), f"run_dir={run_dir}",
               f"reviews.domains={{good: {good}, bad: {bad}}}"])
    err = capsys.readouterr().err
    assert rc == 2 and "r.csv, row 3, field 'overall'" in err, err
    assert not (run_dir / "domains").exists()


def test_reviews_config_reports_every_problem():
    from data_pipeline.config_schema import ConfigError
    from launcher.config import load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "configs" / "loid_reviews.yaml"),
                    ["reviews.k=0", "reviews.min_user_reviews=2", "train.micro_batch_size=1", "loid.pooling=max",
                     "loid.target_domain=digital_music"])
    text = str(err.value)
    for needle in ("reviews.k: 0 must be > 0", "reviews.min_user_reviews: 2",
                   "train.micro_batch_size: 1; LoID's in-batch negatives",
                   "loid.pooling: 'max'", "loid.target_domain: 'digital_music' is also a source"):
        assert needle in text, text


def test_biased_mf_recovers_a_low_rank_rating_matrix():
    from trainers.matrix_factorization import fit_mf, mse

    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(40, 2)), rng.normal(size=(30, 2))
    users, items = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    users, items = users.ravel(), items.ravel()
    ratings = (3.5 + (p[users] * q[items]).sum(1)).astype(np.float32)
    order = rng.permutation(len(users))
    tr, va, te = order[:900], order[900:1050], order[1050:]
    fit = fit_mf((users[tr], items[tr], ratings[tr]), (users[va], items[va], ratings[va]), 40, 30, dim=4,
                 lr=0.05, weight_decay=0.0, max_epochs=2000, patience=50)
    with torch.no_grad():
        pred = fit.model(torch.as_tensor(users[te]), torch.as_tensor(items[te])).numpy()
    mean_mse = mse(np.full(len(te), ratings[tr].mean()), ratings[te])
    assert mse(pred, ratings[te]) < 0.1 * mean_mse


@pytest.mark.parametrize("command", ["train-loid", "train", "plan"])
def test_loid_refuses_zero3_before_starting_ray(command, tmp_path, capsys):
    """A cross-section rule of the loid objective (its check(root)): every entry point rejects it at load."""
    from launcher.cli import main
    from tests.conftest import REPO

    rc = main([command, str(REPO / "configs" / "loid_reviews.yaml"), f"run_dir={tmp_path / 'run'}",
               "train.deepspeed_config=configs/deepspeed/zero3.json"])
    assert rc == 2 and "train.deepspeed_config: configs/deepspeed/zero3.json is ZeRO-3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loid_run_must_be_a_planned_run():
    from data_pipeline.config_schema import ConfigError
    from launcher.config import load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match="loid.run: 'loid_extra' is not a planned run"):
        load_config(str(REPO / "configs" / "loid_reviews.yaml"), ["loid.run=loid_extra"])


def test_review_feed_strides_ranks_and_resumes_exactly():
    """Ranks take disjoint batches of one seeded permutation per epoch; a feed restored from state_dict yields
    exactly the batches the original goes on to yield, across the epoch boundary."""
    from trainers.loid.batches import ReviewFeed

    class Rows:
        def batch(self, rows):
            return list(rows)

    rows = np.arange(40)
    feeds = [ReviewFeed(Rows(), rows, 4, rank, 2, seed=3) for rank in range(2)]
    assert feeds[0].per_epoch == 5
    epoch0 = [[feed.next_batch() for _ in range(5)] for feed in feeds]
    assert all(f.epoch_done for f in feeds)
    seen = [r for batches in epoch0 for b in batches for r in b]
    assert sorted(seen) == list(range(40))  # one epoch: every review once, over both ranks
    feed = feeds[0]
    for _ in range(2):
        feed.next_batch()
    state = feed.state_dict()
    ahead = [feed.next_batch() for _ in range(6)]
    resumed = ReviewFeed(Rows(), rows, 4, 0, 2, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == ahead and resumed.epoch == 2
    assert epoch0[0] != [b for b in ahead[:5]]  # a new permutation each epoch
    with pytest.raises(ValueError, match="cannot resume on 3"):
        ReviewFeed(Rows(), rows, 4, 0, 3, seed=3).load_state_dict(state)
