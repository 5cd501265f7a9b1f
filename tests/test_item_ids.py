"""The build-ids stage on a tiny synthetic catalogue (200 items, 3 x 16 codes) and on the shipped Scientific
index: every scheme's output, collision resolution, determinism, the LLM-alignment switch, cold start."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.config_schema import field_docs
from data_pipeline.errors import DataError
from data_pipeline.item_ids.build_ids import load_codebook, run_build_ids
from data_pipeline.item_ids.collisions import collision_counts, resolve_collisions
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.item_ids.item_codes import code_matrix, read_item_codes, semantic_vocabulary
from data_pipeline.item_ids.llm_text_targets import item_texts, mean_input_embeddings
from data_pipeline.prepare import run_prepare
from ranking.code_trie import CodeTrie
from tests.conftest import DEMO_DATA, REPO

NUM_ITEMS, NUM_TOPICS, EMBED_DIM = 200, 8, 16
HELD_OUT = [str(i) for i in range(5, NUM_ITEMS, 20)]  # 10 items spread over the catalogue
TINY_IDS = dict(levels=3, codes=16, latent_dim=8, hidden_dim=16, epochs=30, batch_size=64, kmeans_sample=200)
TOPIC_WORDS = ["pipette", "beaker", "resistor", "staple", "glove", "magnet", "solder", "filter"]


def _topic(item: int) -> int:
    return item % NUM_TOPICS


def _write_lcrec(folder: Path, name: str, drop: set[str] = frozenset(), with_text: bool = True) -> Path:
    """Users mostly stay inside one topic, so behaviour and text agree on which items are alike."""
    rng = np.random.default_rng(7)
    by_topic = {t: [i for i in range(NUM_ITEMS) if _topic(i) == t and str(i) not in drop] for t in range(NUM_TOPICS)}
    sequences = {}
    for user in range(300):
        topic = user % NUM_TOPICS
        seq = [int(rng.choice(by_topic[topic] if rng.random() < 0.85 else by_topic[int(rng.integers(NUM_TOPICS))]))
               for _ in range(int(rng.integers(4, 9)))]
        sequences[str(user)] = seq
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter.json").write_text(json.dumps(sequences))
    if with_text:
        items = {str(i): {"title": f"{TOPIC_WORDS[_topic(i)]} model {i}",
                          "description": f"A {TOPIC_WORDS[_topic(i)]} for the lab, size {i % 5}.",
                          "brand": "Acme", "categories": "Lab"}
                 for i in range(NUM_ITEMS) if str(i) not in drop}
        (folder / f"{name}.item.json").write_text(json.dumps(items))
    return folder


def _prepare(tmp_path: Path, name: str = "Tiny", drop: set[str] = frozenset(), with_text: bool = True) -> Path:
    raw = _write_lcrec(tmp_path / "raw", name, drop, with_text)
    run_dir = tmp_path / "run"
    run_prepare(DataConfig(format="lcrec", path=str(raw), name=name), str(run_dir))
    return run_dir


def _behaviour_embeddings(run_dir: Path) -> np.ndarray:
    """Fixed per source item (so every prepared variant of the catalogue shares one embedding space)."""
    sources = pq.read_table(run_dir / "dataset" / "items.parquet").column("source_id").to_pylist()
    centres = np.random.default_rng(0).normal(size=(NUM_TOPICS, EMBED_DIM))
    rows = []
    for s in sources:
        noise = np.random.default_rng(1000 + int(s)).normal(scale=0.4, size=EMBED_DIM)
        rows.append(centres[_topic(int(s))] + noise)
    return np.asarray(rows, np.float32)


def _hashed_words(texts: list[str]) -> np.ndarray:
    """Stand-in LM: mean of a fixed random vector per word."""
    out = np.zeros((len(texts), 12), np.float32)
    for i, text in enumerate(texts):
        words = text.lower().replace(".", " ").replace(",", " ").split()
        for w in words:
            out[i] += np.random.default_rng(zlib.crc32(w.encode())).normal(size=12)
        out[i] /= len(words)
    return out


def _semantic(run_dir: Path, seed: int = 0, **overrides) -> dict:
    cfg = IdsConfig(**{**TINY_IDS, **overrides})
    assert cfg.check() == []
    return run_build_ids(cfg, str(run_dir), seed=seed, item_embeddings=_behaviour_embeddings(run_dir),
                         text_embedder=_hashed_words)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("tiny"))


def test_semantic_ids_are_unique_complete_and_described(tiny_run, tmp_path):
    stats = _semantic(tiny_run)
    out = tiny_run / "item_ids"
    table = read_item_codes(str(out))
    codes = code_matrix(table)
    assert table.column("item_id").to_pylist() == list(range(NUM_ITEMS))
    assert codes.shape == (NUM_ITEMS, 3) and codes.min() >= 0 and codes.max() < 16
    assert collision_counts(codes, 16)["duplicate_codes"] == 0
    assert table.column("tokens")[0].as_py() == [f"<{'abc'[lvl]}_{c}>" for lvl, c in enumerate(codes[0])]
    assert json.loads((out / "tokens.json").read_text()) == semantic_vocabulary(3, 16)
    saved = json.loads((out / "stats.json").read_text())
    assert saved["collisions"]["after"]["duplicate_codes"] == 0
    assert saved["collisions"]["before"]["duplicate_codes"] == saved["collisions"]["reassigned_items"]
    assert [u["level"] for u in saved["levels_usage"]] == [0, 1, 2]
    assert all(1 <= u["perplexity"] <= u["used_codes"] <= 16 for u in saved["levels_usage"])
    assert saved["options"]["llm_alignment"]["used"] is True
    assert len(saved["losses"]["per_epoch"]) == 30 and "llm_alignment" in saved["losses"]["final"]
    assert stats["collisions"] == saved["collisions"]
    # Items of one topic share their first code far more often than chance.
    same_topic_same_first = np.mean([codes[i, 0] == codes[j, 0] for i in range(0, NUM_ITEMS, 8)
                                     for j in range(i + 8, NUM_ITEMS, 8)])
    assert same_topic_same_first > 0.5
    tensors, metadata = load_codebook(str(out))
    assert tuple(tensors["codebooks"].shape) == (3, 16, 8) and metadata["levels"] == "3"
    assert tuple(tensors["item_embeddings"].shape) == (NUM_ITEMS, EMBED_DIM)


def test_same_seed_gives_identical_codes_and_another_seed_does_not(tiny_run):
    _semantic(tiny_run, seed=3)
    first = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    _semantic(tiny_run, seed=3)
    again = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    _semantic(tiny_run, seed=4)
    other = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_switching_llm_alignment_off_changes_codes_and_is_recorded(tiny_run):
    on = _semantic(tiny_run, llm_alignment=True)
    codes_on = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    off = _semantic(tiny_run, llm_alignment=False)
    codes_off = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    assert on["options"]["llm_alignment"]["used"] and not off["options"]["llm_alignment"]["used"]
    assert off["options"]["llm_alignment"]["note"] == "off: ids.llm_alignment=false"
    assert "llm_alignment" not in off["losses"]["final"]
    assert (codes_on != codes_off).any(axis=1).mean() > 0.1
    assert off["collisions"]["after"]["duplicate_codes"] == 0


def test_dataset_without_text_uses_behaviour_alone(tmp_path):
    run_dir = _prepare(tmp_path, with_text=False)
    stats = _semantic(run_dir)
    assert stats["options"]["llm_alignment"] == {"requested": True, "used": False, "weight": 0.1,
                                                 "note": "skipped: the dataset has no item text"}
    assert stats["collisions"]["after"]["duplicate_codes"] == 0
    assert len(read_item_codes(str(run_dir / "item_ids"))) == NUM_ITEMS


def test_assign_only_codes_held_out_items_with_the_frozen_codebook(tmp_path):
    train_run = _prepare(tmp_path / "train", drop=set(HELD_OUT))
    _semantic(train_run)
    trained = read_item_codes(str(train_run / "item_ids"))
    assert len(trained) == NUM_ITEMS - len(HELD_OUT)
    codebook_before, _ = load_codebook(str(train_run / "item_ids"))

    full_run = _prepare(tmp_path / "full")
    cfg = IdsConfig(**TINY_IDS, assign_only=True, assign_from=str(train_run / "item_ids"))
    assert cfg.check() == []
    stats = run_build_ids(cfg, str(full_run), item_embeddings=_behaviour_embeddings(full_run))
    out = full_run / "item_ids"
    table = read_item_codes(str(out))
    codes = code_matrix(table)
    assert stats["assign_only"]["new_items"] == 10 and stats["assign_only"]["known_items"] == NUM_ITEMS - 10
    assert stats["assign_only"]["embedding_map_r2_on_known_items"] > 0.999
    assert collision_counts(codes, 16)["duplicate_codes"] == 0
    # Known items keep their codes (matched by source id; dense ids moved), and the codebook is unchanged.
    old = dict(zip(trained.column("source_id").to_pylist(), code_matrix(trained).tolist()))
    sources = table.column("source_id").to_pylist()
    assert all(old[s] == row for s, row in zip(sources, codes.tolist()) if s in old)
    codebook_after, _ = load_codebook(str(out))
    assert np.array_equal(codebook_before["codebooks"].numpy(), codebook_after["codebooks"].numpy())
    # The new items are valid targets of the trie and name themselves.
    trie = CodeTrie.from_item_ids(str(out))
    held_rows = [sources.index(s) for s in HELD_OUT]
    held_codes = codes[held_rows]
    assert trie.is_valid(held_codes).all()
    assert trie.item_of(held_codes).tolist() == table.column("item_id").take(held_rows).to_pylist()
    assert trie.is_valid(codes).all()
    # Their codes follow their behaviour: the first code is one that items of the same topic use.
    topic_first = {t: {int(codes[sources.index(s), 0]) for s in sources if int(s) % NUM_TOPICS == t
                       and s not in HELD_OUT} for t in range(NUM_TOPICS)}
    assert np.mean([codes[sources.index(s), 0] in topic_first[int(s) % NUM_TOPICS] for s in HELD_OUT]) >= 0.9


def test_assign_only_without_new_items_keeps_every_code(tiny_run):
    _semantic(tiny_run)
    before = code_matrix(read_item_codes(str(tiny_run / "item_ids")))
    stats = run_build_ids(IdsConfig(**TINY_IDS, assign_only=True), str(tiny_run),
                          item_embeddings=_behaviour_embeddings(tiny_run))
    assert stats["assign_only"]["new_items"] == 0
    assert np.array_equal(code_matrix(read_item_codes(str(tiny_run / "item_ids"))), before)


def test_assign_only_needs_a_semantic_item_ids(tiny_run, tmp_path):
    run_build_ids(IdsConfig(scheme="atomic"), str(tiny_run))
    with pytest.raises(DataError, match="needs a semantic item_ids"):
        run_build_ids(IdsConfig(**TINY_IDS, assign_only=True), str(tiny_run), item_embeddings=np.zeros((1, 1)))


class _FixedPreference:
    """Preference given as one code order per (row, level), whatever the prefix."""

    def __init__(self, orders: dict[tuple[int, int], list[int]], num_codes: int, levels: int):
        self.orders, self.num_codes, self.levels = orders, num_codes, levels

    def ranked_codes(self, row, prefix):
        return np.array(self.orders.get((row, len(prefix)), list(range(self.num_codes))))

    def nearest_last_codes(self, rows, k):
        return np.stack([self.ranked_codes(r, np.zeros(self.levels - 1, int))[:k] for r in rows])


def test_resolution_moves_the_worse_item_to_the_nearest_free_code():
    # Items 0 and 1 share (0, 0); item 1 is the worse fit and prefers codes 0, 2, 1, 3 at the last level.
    codes = np.array([[0, 0], [0, 0], [0, 2], [1, 1]])
    preference = _FixedPreference({(1, 1): [0, 2, 1, 3]}, 4, 2)
    resolved, report = resolve_collisions(codes, 4, preference, priority=np.array([0.1, 0.5, 0.0, 0.0]))
    assert resolved.tolist() == [[0, 0], [0, 1], [0, 2], [1, 1]]
    assert report == {"reassigned_items": 1, "reassigned_by_depth_first_search": 0, "reassigned_above_last_level": 0}


def test_resolution_gives_a_contested_free_code_to_the_better_item():
    # Rows 1 and 2 both lose (0, 0) to row 0 and both want code 3 next: row 2 fits better and gets it.
    codes = np.array([[0, 0], [0, 0], [0, 0]])
    preference = _FixedPreference({(1, 1): [0, 3, 1, 2], (2, 1): [0, 3, 2, 1]}, 4, 2)
    resolved, _ = resolve_collisions(codes, 4, preference, priority=np.array([0.0, 0.9, 0.5]))
    assert resolved.tolist() == [[0, 0], [0, 1], [0, 3]]


@pytest.mark.parametrize("candidates", [1, 16])
def test_resolution_backs_off_a_level_when_the_prefix_is_full(candidates):
    # Five items want prefix 0 of a 2 x 4 code space: one must move to its nearest other first code.
    codes = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [0, 0]])
    preference = _FixedPreference({(4, 0): [0, 2, 1, 3]}, 4, 2)
    resolved, report = resolve_collisions(codes, 4, preference, priority=np.array([0, 0, 0, 0, 1.0]),
                                          candidates=candidates)
    assert resolved[:4].tolist() == codes[:4].tolist() and resolved[4].tolist() == [2, 0]
    assert report == {"reassigned_items": 1, "reassigned_by_depth_first_search": 1, "reassigned_above_last_level": 1}


def test_resolution_never_moves_frozen_rows():
    codes = np.array([[1, 1], [1, 1], [1, 1]])
    preference = _FixedPreference({}, 3, 2)
    resolved, _ = resolve_collisions(codes, 3, preference, priority=np.array([9.0, 0.0, 1.0]),
                                     frozen=np.array([True, False, False]))
    assert resolved.tolist() == [[1, 1], [1, 0], [1, 2]]
    with pytest.raises(ValueError, match="two frozen rows"):
        resolve_collisions(codes[:2], 3, preference, np.zeros(2), frozen=np.ones(2, bool))


def test_resolution_of_a_crowded_random_catalogue_is_complete():
    # 3 x 4 codes (64 sequences) for 60 items drawn from few cells: most move, some above the last level.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, size=(60, 3))
    latents = rng.normal(size=(60, 2)).astype(np.float32)
    books = rng.normal(size=(3, 4, 2)).astype(np.float32)
    from data_pipeline.item_ids.residual_quantizer import LatentDistancePreference

    resolved, report = resolve_collisions(codes, 4, LatentDistancePreference(books, latents, codes),
                                          priority=rng.random(60), candidates=2)
    assert collision_counts(resolved, 4)["duplicate_codes"] == 0
    assert report["reassigned_above_last_level"] > 0 and report["reassigned_by_depth_first_search"] > 0
    kept = [i for i in range(60) if (resolved[i] == codes[i]).all()]
    assert len(kept) == len({tuple(c) for c in codes.tolist()})


def test_atomic_scheme_adds_one_token_per_item_and_user(tiny_run):
    stats = run_build_ids(IdsConfig(scheme="atomic"), str(tiny_run))
    out = tiny_run / "item_ids"
    tokens = json.loads((out / "tokens.json").read_text())
    users = pq.read_table(out / "user_codes.parquet")
    assert tokens[:2] == ["<item_0>", "<item_1>"] and tokens[NUM_ITEMS] == "<user_0>"
    assert len(tokens) == NUM_ITEMS + users.num_rows == stats["new_tokens"]
    table = read_item_codes(str(out))
    assert table.column("codes").to_pylist()[17] == [17] and table.column("tokens").to_pylist()[17] == ["<item_17>"]
    assert not (out / "codebook.safetensors").exists()


def test_atomic_scheme_without_user_tokens_names_items_only(tiny_run):
    from ranking.user_prompts import PromptBuilder

    stats = run_build_ids(IdsConfig(scheme="atomic", user_tokens=False), str(tiny_run))
    out = tiny_run / "item_ids"
    assert json.loads((out / "tokens.json").read_text()) == [f"<item_{i}>" for i in range(NUM_ITEMS)]
    assert stats["new_tokens"] == NUM_ITEMS and stats["user_tokens"] == 0
    assert not (out / "user_codes.parquet").exists()
    prompt = PromptBuilder(str(tiny_run), NUM_ITEMS, 3, max_history=20).prompt(1, [4, 17])
    assert "<user_" not in prompt and "the user" in prompt and "<item_4>" in prompt and "<item_17>" in prompt
    assert any("user_tokens: false is only read by scheme atomic" in p
               for p in IdsConfig(scheme="semantic", user_tokens=False).check())


def test_subtoken_scheme_writes_the_tokenizer_ids_of_the_item_text(tiny_run):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(REPO / "trainers" / "assets" / "tiny_tokenizer"))
    run_build_ids(IdsConfig(scheme="subtoken"), str(tiny_run), tokenizer=tokenizer)
    out = tiny_run / "item_ids"
    table = read_item_codes(str(out))
    assert json.loads((out / "tokens.json").read_text()) == []
    assert table.column("text").to_pylist()[:2] == ["item_0", "item_1"]
    for codes, text in zip(table.column("codes").to_pylist(), table.column("text").to_pylist()):
        assert tokenizer.decode(codes) == text
    trie = CodeTrie.from_item_ids(str(out), vocab_size=len(tokenizer) + 1, end_token=len(tokenizer))
    assert trie.item_of(table.column("codes")[42].as_py() + [len(tokenizer)]) == 42


def test_precomputed_scheme_imports_the_shipped_scientific_index(demo_dataset, tmp_path):
    run_dir = demo_dataset.parent
    index = json.loads((DEMO_DATA / "Scientific.index.json").read_text())
    stats = run_build_ids(IdsConfig(scheme="precomputed", index_path=str(DEMO_DATA / "Scientific.index.json")),
                          str(run_dir))
    table = read_item_codes(str(run_dir / "item_ids"))
    assert table.num_rows == 4344 and stats["collisions"]["after"]["duplicate_codes"] == 0
    for row in (0, 1234, 4343):
        assert table.column("tokens")[row].as_py() == index[table.column("source_id")[row].as_py()]
    del index["1234"]
    partial = tmp_path / "partial.index.json"
    partial.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"item 1234 \(source id '1234'\) has no code"):
        run_build_ids(IdsConfig(scheme="precomputed", index_path=str(partial)), str(run_dir))


def test_default_inputs_baseline_embeddings_and_lm_text_targets(tiny_run):
    """The real input path: the item embeddings of the baseline stage's SASRec and the tiny LM's input embeddings."""
    from trainers.baseline import run_train_baseline
    from trainers.lm_text_embedder import lm_text_embedder
    from trainers.model_config import ModelConfig
    from trainers.models import build_model
    from trainers.sasrec import load_sasrec
    from trainers.sasrec_config import SASRecConfig

    run_train_baseline(SASRecConfig(hidden_size=16, epochs=2, eval_every=1), str(tiny_run))
    stats = run_build_ids(IdsConfig(**TINY_IDS), str(tiny_run), text_embedder=lm_text_embedder(ModelConfig(), 256))
    assert stats["options"]["item_embeddings"]["source"] == "baseline"
    assert stats["options"]["item_embeddings"]["hidden_size"] == 16
    coded = load_codebook(str(tiny_run / "item_ids"))[0]["item_embeddings"]
    assert np.array_equal(coded.numpy(), load_sasrec(str(tiny_run / "baseline")).item_embeddings().numpy())
    assert stats["options"]["llm_alignment"]["used"] and stats["options"]["llm_alignment"]["items_with_text"] == 200
    assert stats["collisions"]["after"]["duplicate_codes"] == 0
    # Text targets are the mean of the LM's input embedding rows over the text's tokens.
    model, tokenizer = build_model(ModelConfig(size="tiny"))
    table = model.get_input_embeddings().weight
    texts = [t for t in item_texts(pq.read_table(tiny_run / "dataset" / "items.parquet"))][:3]
    expected = np.stack([table[tokenizer(t, add_special_tokens=False)["input_ids"]].mean(0).detach().numpy()
                         for t in texts])
    assert np.allclose(mean_input_embeddings(texts, table, tokenizer, 256), expected, atol=1e-6)
    assert np.allclose(lm_text_embedder(ModelConfig(size="tiny"), 256)(texts), expected, atol=1e-6)


def test_config_fields_documented_and_errors_reported_together():
    docs = field_docs(IdsConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(IdsConfig))
    problems = IdsConfig(scheme="hash", codes=1, levels=0, llm_alignment_weight=-1, index_path="x").check()
    assert len(problems) == 5, problems
    assert any("assign_only: true needs scheme semantic" in p for p in IdsConfig(scheme="atomic", assign_only=True).check())


def test_build_ids_is_a_stage_after_prepare(tiny_run, capsys):
    from launcher.cli import main
    from launcher.config import load_config
    from launcher.stages import STAGES

    assert list(STAGES)[:3] == ["prepare", "train-baseline", "build-ids"]
    assert main(["build-ids", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={tiny_run}", "ids.scheme=atomic"]) == 0
    assert "item ids: atomic scheme, 200 items" in capsys.readouterr().out
    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), ["ids.scheme=precomputed", "ids.levels=3", "baseline.epochs=5"])
    assert cfg.ids.scheme == "precomputed" and cfg.ids.levels == 3 and cfg.baseline.epochs == 5


def test_collaborative_subtoken_numbers_give_similar_items_neighbouring_numbers(tiny_run):
    """Numbered by the k-means tree of their vectors, each topic's items take one contiguous run of numbers
    (catalogue ids interleave the topics), every number has the same digit count, and the seed fixes them."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(REPO / "trainers" / "assets" / "tiny_tokenizer"))
    cfg = IdsConfig(scheme="subtoken", subtoken_numbers="collaborative")
    assert cfg.check() == []
    vectors = _behaviour_embeddings(tiny_run)
    stats = run_build_ids(cfg, str(tiny_run), seed=3, tokenizer=tokenizer, item_embeddings=vectors)
    table = read_item_codes(str(tiny_run / "item_ids"))
    texts = table.column("text").to_pylist()
    numbers = np.array([int(t.removeprefix("item_")) for t in texts])
    assert stats["numbers"] == "collaborative" and len(set(numbers)) == len(numbers) == table.num_rows
    assert {len(str(n)) for n in numbers} == {3} and numbers.min() == 100  # 190 items -> 100..289
    sources = table.column("source_id").to_pylist()
    for topic in range(NUM_TOPICS):
        mine = np.sort(numbers[[_topic(int(s)) == topic for s in sources]])
        assert mine[-1] - mine[0] + 1 == len(mine), f"topic {topic} is split: {mine.tolist()}"
    for codes, text in zip(table.column("codes").to_pylist(), texts):
        assert tokenizer.decode(codes) == text
    run_build_ids(cfg, str(tiny_run), seed=3, tokenizer=tokenizer, item_embeddings=vectors)
    assert read_item_codes(str(tiny_run / "item_ids")).column("text").to_pylist() == texts
    assert any("subtoken_numbers: 'collaborative' is only read by scheme subtoken" in p
               for p in IdsConfig(scheme="semantic", subtoken_numbers="collaborative").check())
