"""Item text read by an LM (issue #26): the vectors' cache, whitening, and the multinomial scorer's text expert
(untrained items scored from their text neighbours, trained items' scores untouched by catalogue growth)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.item_ids.text_config import TextConfig
from data_pipeline.item_ids.text_vectors import build_text_vectors, item_documents, whiten
from ranking.text_expert import TextExpert, trained_items


def _unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_untrained_items_take_the_softmax_mix_of_their_text_neighbours_logits_by_hand():
    vectors = _unit([[1, 0], [0, 1], [1, 1], [1, 0.1]])  # item 3 is new; its nearest trained items: 0, then 2
    trained = np.array([True, True, True, False])
    expert = TextExpert(vectors, trained, history=1, weight=0.0, neighbours=2, temperature=0.5, untrained_bias=0.7)
    logits = torch.tensor([[2.0, -1.0, 0.5, 99.0]])  # the untrained item's own logit is never read
    cos = vectors[3] @ vectors[[0, 2]].T
    mix = np.exp(cos / 0.5) / np.exp(cos / 0.5).sum()
    expected = np.array([2.0, -1.0, 0.5, mix @ np.array([2.0, 0.5]) + 0.7])
    expected -= np.log(np.exp(expected[:3]).sum())  # normalised over the trained items only
    assert np.allclose(expert.scores(logits, [[0]]).numpy()[0], expected, atol=1e-5)


def test_adding_new_items_leaves_the_trained_items_scores_unchanged():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(8, 5)))
    logits = torch.from_numpy(rng.normal(size=(3, 8)).astype(np.float32))
    before = TextExpert(vectors[:6], np.ones(6, bool), history=2, weight=3.0).scores(logits[:, :6], [[0], [1, 2], [5]])
    grown = TextExpert(vectors, np.array([True] * 6 + [False] * 2), history=2, weight=3.0)
    after = grown.scores(logits, [[0], [1, 2], [5]])
    assert torch.allclose(after[:, :6], before, atol=1e-6)
    assert torch.isfinite(after[:, 6:]).all()


def test_with_every_item_trained_and_weight_zero_the_scores_are_the_log_softmax():
    logits = torch.randn(4, 7)
    expert = TextExpert(_unit(np.random.default_rng(1).normal(size=(7, 3))), np.ones(7, bool), history=3, weight=0.0)
    assert torch.allclose(expert.scores(logits, [[0]] * 4), torch.log_softmax(logits, -1), atol=1e-6)


def test_text_scores_are_the_cosine_with_the_mean_of_the_last_history_items():
    vectors = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    expert = TextExpert(vectors, np.ones(4, bool), history=2, weight=1.0)
    query = (vectors[1] + vectors[2]) / 2  # history [0, 1, 2], last 2
    expected = vectors @ (query / np.linalg.norm(query))
    assert np.allclose(expert.text_scores([[0, 1, 2]]).numpy()[0], expected, atol=1e-6)


def test_trained_items_are_those_in_any_train_history_or_target():
    assert trained_items([[0, 1], [1]], np.array([2, 4]), 6).tolist() == [True, True, True, False, True, False]


def test_whitening_gives_unit_rows_with_decorrelated_axes():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 5.0  # correlated, off-centre
    white = whiten(raw, dims=4)
    assert white.shape == (200, 4) and np.allclose(np.linalg.norm(white, axis=1), 1, atol=1e-5)
    assert np.array_equal(white, whiten(raw, dims=4))  # deterministic
    unnormalised = (raw - raw.mean(0)) @ np.linalg.svd(raw - raw.mean(0), full_matrices=False)[2][:4].T
    corr = np.corrcoef(unnormalised.T)
    assert np.allclose(corr - np.diag(np.diag(corr)), 0, atol=1e-6)


def _items(titles: list[str | None]) -> pa.Table:
    return pa.table({"item_id": list(range(len(titles))), "title": titles, "brand": [None] * len(titles),
                     "categories": [None] * len(titles)})


def test_the_vector_cache_is_reused_for_the_same_text_and_weights_and_rebuilt_when_either_changes(tmp_path):
    from trainers.lm_text_vectors import lm_text_encoder

    real = lm_text_encoder("tiny", "", layer=1, max_tokens=8, batch_size=2)
    calls = []

    def encode(texts):  # the real tiny LM, with its calls counted
        calls.append(list(texts))
        return real(texts)

    cfg = TextConfig(vectors=True, fields=["title"], layer=1, max_tokens=8, dims=3)
    cache = lambda key: str(tmp_path / f"{key}.safetensors")  # noqa: E731
    titles = ["red guitar strings", "blue drum", None, "soldering iron", "glass slides"]
    first, stats = build_text_vectors(_items(titles), cfg, cache, encode, reader_id="weights-a")
    assert len(calls) == 1 and calls[0] == [t for t in titles if t] and not stats["cache_hit"]
    assert first.shape == (5, 3) and not first[2].any()  # the item without text gets a zero row
    again, stats = build_text_vectors(_items(titles), cfg, cache, encode, reader_id="weights-a")
    assert len(calls) == 1 and stats["cache_hit"] and np.array_equal(again, first)
    build_text_vectors(_items(titles), cfg, cache, encode, reader_id="weights-b")  # other weights
    assert len(calls) == 2
    build_text_vectors(_items(titles[:4] + ["glass slide"]), cfg, cache, encode, reader_id="weights-a")  # new text
    assert len(calls) == 3 and calls[2][-1] == "glass slide"
    assert not list(tmp_path.glob("*.tmp-*"))


def test_documents_join_the_chosen_fields_and_skip_empty_ones():
    docs = item_documents({"title": ["A", None, " "], "brand": ["B", "C", None]}, ["title", "brand"])
    assert docs == ["A\nB", "C", ""]


@pytest.mark.parametrize("bad", [{"fields": ["colour"]}, {"layer": 0}, {"dims": -1}])
def test_text_config_errors_name_the_field(bad):
    problems = TextConfig(**bad).check()
    assert problems and problems[0].split(":")[0] in bad


def test_neighbour_weights_are_the_same_computed_in_small_chunks():
    rng = np.random.default_rng(3)
    vectors = _unit(rng.normal(size=(60, 8)))
    trained = rng.random(60) < 0.7
    whole = TextExpert(vectors, trained, history=2, weight=1.0, neighbours=5)
    chunked = TextExpert(vectors, trained, history=2, weight=1.0, neighbours=5)
    chunked.untrained_mix = chunked._neighbour_weights(5, 0.05, max_scores=len(whole.trained_ids) * 3)
    assert torch.equal(whole.untrained_mix[0], chunked.untrained_mix[0])  # the same neighbours
    assert torch.allclose(whole.untrained_mix[1], chunked.untrained_mix[1], atol=1e-6)
    logits = torch.from_numpy(rng.normal(size=(4, 60)).astype(np.float32))
    assert torch.allclose(whole.scores(logits, [[0, 1]] * 4), chunked.scores(logits, [[0, 1]] * 4))
