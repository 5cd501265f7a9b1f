"""CLLM4Rec's sample tasks and tokens: content twins from build-ids, the collaborative LM's item-only main
text, the content LM's vocabulary-only main text (reviews from train interactions only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.item_ids.atomic_ids import build_atomic_ids
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.prepare import run_prepare
from data_pipeline.samples.build_samples import build_samples
from data_pipeline.samples.config import SamplesConfig
from data_pipeline.samples.prompt_templates import MIN_PARAPHRASES, load_instruction_bank
from tests.test_samples import NO_TEXT_ITEMS, _rows, _samples, _with_ids, toy_dataset  # noqa: F401 (fixture)

ITEM = re.compile(r"<item_(\d+)>")


def test_content_twins_follow_the_collaborative_tokens(toy_dataset):
    items = pq.read_table(toy_dataset / "dataset" / "items.parquet").sort_by("item_id")
    users = pq.read_table(toy_dataset / "dataset" / "users.parquet").sort_by("user_id")
    plain = build_atomic_ids(items, users)
    twins = build_atomic_ids(items, users, content_tokens=True)
    n = len(plain.new_tokens)
    assert twins.new_tokens[:n] == plain.new_tokens  # collaborative tokens keep their ids
    assert twins.new_tokens[n:] == ["<text_" + t[1:] for t in plain.new_tokens]
    assert twins.stats["content_tokens"] == n
    assert IdsConfig(scheme="subtoken", content_tokens=True).check()


def test_instruction_bank_has_ten_paraphrases_per_task():
    bank = load_instruction_bank()
    assert len(bank) >= 2 and all(len(set(v)) >= MIN_PARAPHRASES for v in bank.values())
    all_lines = [x for v in bank.values() for x in v]
    assert len(all_lines) == len(set(all_lines))  # no instruction belongs to two tasks


@pytest.fixture(scope="module")
def cllm4rec_run(toy_dataset, tmp_path_factory) -> Path:
    run_dir = _with_ids(toy_dataset, tmp_path_factory.mktemp("cllm4rec"), "atomic")
    items = pq.read_table(run_dir / "dataset" / "items.parquet").sort_by("item_id")
    users = pq.read_table(run_dir / "dataset" / "users.parquet").sort_by("user_id")
    (run_dir / "item_ids" / "tokens.json").write_text(json.dumps(build_atomic_ids(items, users, True).new_tokens))
    build_samples(SamplesConfig(tasks=["sequential", "collaborative_lm", "content_lm"]), str(run_dir), seed=0)
    return run_dir


def test_collaborative_lm_main_text_is_the_users_train_items_as_tokens_only(cllm4rec_run):
    docs = {}
    for row in _rows(cllm4rec_run, "train"):
        full = row["history"] + [row["target"]]
        if len(full) > len(docs.get(row["user_id"], [])):
            docs[row["user_id"]] = full
    rows = [s for s in _samples(cllm4rec_run) if s["task"] == "collaborative_lm"]
    assert len(rows) == len(docs)
    for s in rows:
        assert re.fullmatch(r"(<item_\d+>)+", s["response"])  # homogeneous: item tokens, nothing else
        assert [int(x) for x in ITEM.findall(s["response"])] == docs[s["user_id"]][-20:]
        assert f"<user_{s['user_id']}>" in s["prompt"]  # heterogeneous prompt: user token + words


def test_content_lm_uses_the_content_twins_and_vocabulary_only_text(cllm4rec_run):
    rows = [s for s in _samples(cllm4rec_run) if s["task"] == "content_lm"]
    n_items = pq.read_metadata(cllm4rec_run / "dataset" / "items.parquet").num_rows
    assert {s["item_id"] for s in rows} == set(range(n_items)) - NO_TEXT_ITEMS
    for s in rows:
        assert f"<text_item_{s['item_id']}>" in s["prompt"] and "<item_" not in s["prompt"]
        assert "<" not in s["response"]  # main text: vocabulary only
    assert not any(ITEM.search(s["prompt"]) for s in rows)


def test_content_lm_reviews_come_from_train_interactions_only(tmp_path):
    from tests.conftest import shared_dataset

    path = shared_dataset("musical_instruments_reviews_partial")
    run_prepare(DataConfig(format="amazon_reviews", path=str(path)), str(tmp_path))
    items = pq.read_table(tmp_path / "dataset" / "items.parquet").sort_by("item_id")
    users = pq.read_table(tmp_path / "dataset" / "users.parquet").sort_by("user_id")
    built = build_atomic_ids(items, users, content_tokens=True)
    (tmp_path / "item_ids").mkdir()
    pq.write_table(built.items, tmp_path / "item_ids" / "item_codes.parquet")
    for name, extra in built.tables.items():
        pq.write_table(extra, tmp_path / "item_ids" / name)
    (tmp_path / "item_ids" / "tokens.json").write_text(json.dumps(built.new_tokens))
    build_samples(SamplesConfig(tasks=["content_lm"]), str(tmp_path), seed=0)
    reviews = [s for s in _samples(tmp_path) if s["task"] == "content_lm" and s["user_id"] is not None]
    assert reviews and all(f"<text_user_{s['user_id']}>" in s["prompt"] for s in reviews)
    held_out = {(r["user_id"], r["target"]) for split in ("valid", "test") for r in _rows(tmp_path, split)}
    assert not {(s["user_id"], s["item_id"]) for s in reviews} & held_out
