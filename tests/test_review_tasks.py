"""ControlRec review tasks: templates checked at load, samples built only from the right split (no test review
in training), candidates well formed, and the scores (rating parse/MSE, ROUGE-L, BLEU, hit rate) on hand-checked
replies."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_pipeline.errors import DataError
from data_pipeline.reviews.build_reviews import build_review_table
from data_pipeline.reviews.config import ReviewsConfig
from data_pipeline.reviews.review_samples import REVIEW_TASK_CODES, build_task_rows, cut_words, load_templates
from data_pipeline.reviews.task_config import ReviewTasksConfig
from inference.review_tasks import parse_rating, pick_scores, rating_scores, text_scores


@pytest.fixture(scope="module")
def reviews():
    from data_pipeline.canonical import build_canonical
    from data_pipeline.config import DataConfig
    from data_pipeline.importers import import_raw
    from tests.conftest import REPO

    cfg = DataConfig(format="amazon_reviews", path=str(REPO / "data" / "reviews" / "musical_instruments"))
    return build_review_table(build_canonical(import_raw(cfg), cfg).interactions.to_pandas(), ReviewsConfig(), "mi")


def test_shipped_templates_have_paraphrases_and_bad_slots_fail():
    templates = load_templates()
    assert set(templates) == set(REVIEW_TASK_CODES) and all(len(t) >= 3 for t in templates.values())
    bad = {"variants": {**{t: [{"prompt": p, "response": r} for p, r in v] for t, v in templates.items()},
                        "rating": [{"prompt": "Rate {item} for {usr}", "response": "{rating}"}]}}
    with pytest.raises(DataError, match=r"rating\[0\]"):
        load_templates(json.dumps(bad))


def test_samples_come_from_their_split_and_candidates_are_sound(reviews):
    cfg = ReviewTasksConfig(candidates=5)
    templates = load_templates()
    frame = reviews.to_pandas().set_index("review_id")
    train = build_task_rows(reviews, cfg, "train", 0, templates).to_pandas()
    test = build_task_rows(reviews, cfg, "test", 0, templates, template_index=0).to_pandas()
    assert set(frame.loc[train.review_id, "split"]) == {"train"}
    assert set(frame.loc[test.review_id, "split"]) == {"test"}
    assert (test.template == 0).all() and train.template.nunique() == 3
    assert train.sample_id.is_unique and pd.Series(train.sample_id.to_numpy() >> 40).isin(REVIEW_TASK_CODES.values()).all()
    reviewed = frame.groupby("user_id").item_id.agg(set)
    for _, row in test[test.task == "direct_recommendation"].iterrows():
        cands = row.prompt.split("from: ")[1].rstrip(".").split(", ")
        assert len(cands) == 5 and cands.count(row.response) == 1 == len(set(cands)) - 4
        decoys = {int(c[6:-1]) for c in cands if c != row.response}
        assert not decoys & reviewed[row.user_id]
    expl = test[test.task == "explanation"].iloc[0]
    assert expl.response == cut_words(frame.loc[expl.review_id, "text"], cfg.review_words)
    summ = test[test.task == "review_summary"].iloc[0]
    assert summ.response == frame.loc[summ.review_id, "summary"]
    rate = test[test.task == "rating"]
    assert (rate.response.astype(float) == frame.loc[rate.review_id, "rating"].round().to_numpy()).all()


def test_rating_parse_and_mse_by_hand():
    assert parse_rating("4 stars") == 4.0 and parse_rating("I'd say 5") == 5.0 and parse_rating("great!") is None
    s = rating_scores(["5", "2", "no idea"], [4.0, 2.0, 3.0], fallback=4.0)
    # squared errors 1, 0 and (4 - 3)^2 = 1 for the unparsed reply -> 2/3
    assert s["mse"] == pytest.approx(2 / 3) and s["unparsed"] == 1
    assert s["train_mean_mse"] == pytest.approx((0 + 4 + 1) / 3)


def test_rouge_l_and_bleu_from_the_libraries():
    same = text_scores(["the strap fits my guitar well"], ["the strap fits my guitar well"])
    assert same["rougeL"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    # LCS of "great strap for the price" and "a great strap" = 2 words: P = 2/5, R = 2/3, F = 0.5
    half = text_scores(["great strap for the price"], ["a great strap"])
    assert half["rougeL"] == pytest.approx(50.0)
    assert text_scores(["nothing alike here"], ["a great strap"])["rougeL"] == 0.0


def test_hit_rate_counts_the_first_item_token():
    prompts = ["Pick from: <item_1>, <item_2>, <item_3>."] * 3
    s = pick_scores(["<item_2>", "<item_9> <item_2>", "none"], ["<item_2>"] * 3, prompts)
    assert s["hit_rate"] == pytest.approx(1 / 3) and s["valid_pick_rate"] == pytest.approx(1 / 3)
    from inference.review_tasks import candidate_tokens

    other = "Candidates: <item_4>, <item_5>. Given <user_1>'s history <item_9>, choose the best item."
    assert candidate_tokens(prompts[0]) == ["1", "2", "3"] and candidate_tokens(other) == ["4", "5"]


def test_review_tasks_config_reports_problems():
    from data_pipeline.config_schema import ConfigError
    from launcher.config import load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "configs" / "controlrec_tasks.yaml"),
                    ["review_tasks.tasks=[rating,poetry]", "review_tasks.candidates=1"])
    assert "review_tasks.tasks: 'poetry'" in str(err.value) and "review_tasks.candidates: 1" in str(err.value)


def test_decoding_frames_prompts_exactly_as_training(monkeypatch):
    import torch

    from inference.review_tasks import greedy_replies
    from trainers.model_config import ModelConfig
    from trainers.models import build_model
    from trainers.packing import tokenize_sample

    model, tok = build_model(ModelConfig(), ["<item_1>", "<user_1>"], seed=0)
    prompts = ["Rate <item_1> for <user_1>.", "A much longer prompt about <item_1> and its strings."]
    seen = {}

    def fake_generate(input_ids, attention_mask, **kw):
        seen["ids"], seen["mask"] = input_ids, attention_mask
        return torch.cat([input_ids, torch.full((len(input_ids), 1), tok.convert_tokens_to_ids("<item_1>"))], 1)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert greedy_replies(model, tok, prompts, 4, 8) == ["<item_1>", "<item_1>"]
    for row, mask, prompt in zip(seen["ids"].tolist(), seen["mask"].tolist(), prompts):
        ids, prompt_len = tokenize_sample(tok, prompt, "x", 256)
        assert [t for t, m in zip(row, mask) if m] == ids[:prompt_len]  # left-padded, same tokens as training


def test_ranked_picks_choose_the_best_candidate_never_an_outside_item():
    from types import SimpleNamespace

    import torch

    from inference.review_tasks import ranked_picks
    from trainers.models import tiny

    _, tok = tiny([f"<item_{i}>" for i in range(6)], seed=0)
    item = {i: tok.convert_tokens_to_ids(f"<item_{i}>") for i in range(6)}

    def fake_lm(input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(len(input_ids), 1, len(tok))
        logits[:, -1, item[5]] = 9.0  # the model's favourite overall is not a candidate
        logits[0, -1, item[2]], logits[1, -1, item[3]] = 3.0, 4.0
        return SimpleNamespace(logits=logits)

    prompts = ["Pick one item from: <item_1>, <item_2>, <item_3>.", "Candidates: <item_3>, <item_4>. Given x"]
    assert ranked_picks(fake_lm, tok, prompts, batch_size=2) == ["<item_2>", "<item_3>"]
