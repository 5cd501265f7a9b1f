"""build-samples: training samples from a tiny prepared dataset and hand-written item codes."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.item_ids.atomic_ids import build_atomic_ids
from data_pipeline.item_ids.item_codes import item_codes_table
from data_pipeline.prepare import run_prepare
from data_pipeline.samples.build_samples import build_samples
from data_pipeline.samples.config import DEFAULT_TASKS, TASKS, SamplesConfig
from data_pipeline.samples.prompt_templates import TEMPLATE_PACKAGE, load_templates
from data_pipeline.samples.tasks import sample_negatives
from data_pipeline.sharding import user_shard
from launcher.cli import main
from tests.conftest import REPO

NUM_ITEMS, NUM_USERS = 40, 12
NO_TEXT_ITEMS = {35, 36, 37, 38, 39}
DESCRIPTION_ONLY = {30, 31}
ITEM_TOKEN = re.compile(r"<item_(\d+)>")


def _raw(folder: Path, with_catalogue: bool = True) -> Path:
    rng = np.random.default_rng(7)
    seqs = {str(u): rng.choice(NUM_ITEMS, size=int(rng.integers(3, 9)), replace=False).tolist() for u in range(NUM_USERS)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Toy.inter.json").write_text(json.dumps(seqs))
    if with_catalogue:
        catalogue = {}
        for i in range(NUM_ITEMS):
            if i in NO_TEXT_ITEMS:
                catalogue[str(i)] = {}
            elif i in DESCRIPTION_ONLY:
                catalogue[str(i)] = {"description": f"A plain description of thing {i}. It works."}
            else:
                catalogue[str(i)] = {"title": f"Acme ZX{i}00 Widget Number {i}, Blue.", "brand": "Acme",
                                     "description": f"Widget {i} " + "word " * 100,
                                     "categories": "Industrial & Scientific,Tools,Widgets" if i % 2 else ""}
        (folder / "Toy.item.json").write_text(json.dumps(catalogue))
    return folder


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("toy")
    run_prepare(DataConfig(format="lcrec", path=str(_raw(run_dir / "raw")), name="Toy", num_shards=2), str(run_dir))
    return run_dir


def _with_ids(src: Path, dst: Path, scheme: str) -> Path:
    """A run dir holding src's dataset/ and a hand-written item_ids/ of ``scheme``."""
    shutil.copytree(src / "dataset", dst / "dataset")
    items = pq.read_table(dst / "dataset" / "items.parquet").sort_by("item_id")
    ids = items.column("item_id").to_pylist()
    (dst / "item_ids").mkdir()
    if scheme == "atomic":
        built = build_atomic_ids(items, pq.read_table(dst / "dataset" / "users.parquet").sort_by("user_id"))
        table = built.items
        for name, extra in built.tables.items():
            pq.write_table(extra, dst / "item_ids" / name)
    elif scheme == "semantic":
        codes = [[i % 4, i // 4, 0] for i in ids]
        table = item_codes_table(items, codes, [[f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for a, b, c in codes])
    else:  # subtoken: codes are tokenizer ids; prompts carry the text
        table = item_codes_table(items, [[1, 2, i] for i in ids], [["item", "_", str(i)] for i in ids],
                                 text=[f"item_{i}" for i in ids])
    pq.write_table(table, dst / "item_ids" / "item_codes.parquet")
    (dst / "item_ids" / "stats.json").write_text(json.dumps({"scheme": scheme}))
    return dst


def _render(scheme: str, item: int) -> str:
    if scheme == "semantic":
        return f"<a_{item % 4}><b_{item // 4}><c_0>"
    return f"<item_{item}>" if scheme == "atomic" else f"item_{item}"


def _samples(run_dir: Path, split: str = "train") -> list[dict]:
    return pq.read_table(run_dir / "samples" / split).sort_by("sample_id").to_pylist()


def _rows(run_dir: Path, split: str) -> list[dict]:
    return pq.read_table(run_dir / "dataset" / "sequences" / split).to_pylist()


def _interacted(run_dir: Path) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for r in pq.read_table(run_dir / "dataset" / "interactions", columns=["user_id", "item_id"]).to_pylist():
        out.setdefault(r["user_id"], set()).add(r["item_id"])
    return out


@pytest.fixture(scope="module")
def atomic_run(toy_dataset, tmp_path_factory) -> Path:
    run_dir = _with_ids(toy_dataset, tmp_path_factory.mktemp("atomic"), "atomic")
    build_samples(SamplesConfig(), str(run_dir), seed=0)
    return run_dir


def test_templates_come_from_the_data_files_five_or_more_per_variant():
    from importlib import resources

    from data_pipeline.samples.prompt_templates import TEMPLATE_FREE_TASKS

    for task in [t for t in TASKS if t not in TEMPLATE_FREE_TASKS]:
        on_disk = json.loads(resources.files(TEMPLATE_PACKAGE).joinpath(f"{task}.json").read_text())
        loaded = load_templates(task)
        assert set(loaded) == set(on_disk["variants"])
        for variant, templates in loaded.items():
            assert len(templates) >= 5, (task, variant)
            assert [t.prompt for t in templates] == [t["prompt"] for t in on_disk["variants"][variant]]


def test_every_prompt_is_one_of_the_templates_and_several_are_used(atomic_run):
    templates = load_templates("sequential")["next_item"]
    users = {r["user_id"]: r for r in pq.read_table(atomic_run / "item_ids" / "user_codes.parquet").to_pylist()}
    train = {(r["user_id"], r["target"]): r["history"] for r in _rows(atomic_run, "train")}
    used = Counter()
    for s in (s for s in _samples(atomic_run) if s["task"] == "sequential"):
        history = ", ".join(_render("atomic", i) for i in train[(s["user_id"], s["item_id"])][-20:])
        rendered = [t.render(user=f"user {users[s['user_id']]['token']}", history=history,
                             item=_render("atomic", s["item_id"])) for t in templates]
        assert (s["prompt"], s["response"]) in rendered
        used[rendered.index((s["prompt"], s["response"]))] += 1
    assert len(used) >= 4


def test_no_valid_or_test_target_reaches_training_samples(atomic_run):
    held_out: dict[int, set[int]] = {}
    for split in ("valid", "test"):
        for r in _rows(atomic_run, split):
            held_out.setdefault(r["user_id"], set()).add(r["target"])
    train_pairs = {(r["user_id"], r["target"]) for r in _rows(atomic_run, "train")}
    samples = _samples(atomic_run)
    seq = [s for s in samples if s["task"] == "sequential"]
    assert {(s["user_id"], s["item_id"]) for s in seq} == train_pairs and len(seq) == len(train_pairs)
    user_samples = [s for s in samples if s["user_id"] is not None]
    assert {s["task"] for s in user_samples} == {"sequential", "negative"}
    for s in user_samples:  # every user's items are distinct, so a held-out target can only appear by leaking
        mentioned = {int(i) for i in ITEM_TOKEN.findall(s["prompt"] + s["response"])}
        assert not mentioned & held_out.get(s["user_id"], set()), s
    valid = _samples(atomic_run, "valid")
    valid_rows = _rows(atomic_run, "valid")
    assert {(s["user_id"], s["item_id"]) for s in valid} == {(r["user_id"], r["target"]) for r in valid_rows}


@pytest.mark.parametrize("ratio", [3, 2])
def test_negatives_are_never_interacted_items_and_follow_the_ratio(toy_dataset, tmp_path, ratio):
    run_dir = _with_ids(toy_dataset, tmp_path, "atomic")
    manifest = build_samples(SamplesConfig(tasks=["negative"], negative_ratio=ratio), str(run_dir), seed=3)
    interacted = _interacted(run_dir)
    train = {(r["user_id"], r["target"]): r["history"] for r in _rows(run_dir, "train")}
    negatives = _samples(run_dir)
    assert len(negatives) == len(train) == manifest["counts"]["train"]["negative"]
    seen = set()
    for s in negatives:
        assert s["response"] == _render("atomic", s["item_id"])
        tokens = [int(i) for i in ITEM_TOKEN.findall(s["prompt"])]
        named = [i for i in tokens if i not in set(train[(s["user_id"], s["item_id"])])]
        assert len(named) == len(set(named)) == ratio, s["prompt"]
        assert not set(named) & interacted[s["user_id"]]
        seen |= set(named)
    assert len(seen) > NUM_ITEMS // 2  # drawn across the catalogue, not a fixed few


def test_negative_sampling_is_uniform_over_items_never_interacted():
    rng = np.random.default_rng(0)
    for interacted in (frozenset({0, 1, 2}), frozenset(range(8))):  # rejection and explicit branches
        counts = Counter()
        for _ in range(6000):
            drawn = sample_negatives(rng, interacted, 12, 3)
            assert len(set(drawn)) == 3 and not set(drawn) & interacted
            counts.update(drawn)
        free = 12 - len(interacted)
        assert set(counts) == set(range(12)) - interacted
        expected = 6000 * 3 / free
        assert all(abs(c - expected) < 0.06 * expected for c in counts.values()), counts
    assert sample_negatives(rng, frozenset(range(10)), 12, 3) is None


def test_text_tasks_follow_the_catalogue_and_are_skipped_without_text(atomic_run, tmp_path):
    samples = _samples(atomic_run)
    by_task = {t: [s for s in samples if s["task"] == t] for t in DEFAULT_TASKS}
    text_items = {s["item_id"] for s in by_task["text_alignment"]}
    assert text_items == set(range(NUM_ITEMS)) - NO_TEXT_ITEMS
    assert {s["item_id"] for s in by_task["query_alignment"]} == text_items
    titled = set(range(NUM_ITEMS)) - NO_TEXT_ITEMS - DESCRIPTION_ONLY
    assert len(by_task["text_alignment"]) == 3 * len(titled) + len(DESCRIPTION_ONLY)
    for s in by_task["text_alignment"]:
        if s["response"].startswith("Acme"):  # item -> title
            assert s["response"] == f"Acme ZX{s['item_id']}00 Widget Number {s['item_id']}, Blue."
            assert _render("atomic", s["item_id"]) in s["prompt"]
        else:
            assert s["response"] == _render("atomic", s["item_id"])
            assert len(s["prompt"].split()) < 64 + 20  # descriptions cut to max_description_words
    for s in by_task["query_alignment"]:
        i = s["item_id"]
        if i in titled:  # brand and model code ZX..00 dropped, cut at the comma; leaf category when the path has one
            assert f"Widget Number {i}" in s["prompt"] and "Acme" not in s["prompt"] and "ZX" not in s["prompt"]
            assert ("Widgets" in s["prompt"]) == bool(i % 2)
        else:
            assert f"A plain description of thing {i}" in s["prompt"]

    run_dir = tmp_path / "plain"
    run_prepare(DataConfig(format="lcrec", path=str(_raw(tmp_path / "raw", with_catalogue=False)), name="Toy"),
                str(run_dir))
    _with_ids(run_dir, tmp_path / "run", "semantic")
    manifest = build_samples(SamplesConfig(), str(tmp_path / "run"), seed=0)
    assert set(manifest["counts"]["train"]) == {"sequential", "negative", "total"}
    assert set(manifest["notes"]) == {"text_alignment", "query_alignment"}
    assert {s["task"] for s in _samples(tmp_path / "run")} == {"sequential", "negative"}


@pytest.mark.parametrize("scheme", ["atomic", "semantic", "subtoken"])
def test_prompts_write_items_with_the_scheme_tokens(toy_dataset, tmp_path, scheme):
    run_dir = _with_ids(toy_dataset, tmp_path, scheme)
    build_samples(SamplesConfig(max_history_in_prompt=2), str(run_dir), seed=1)
    train = {(r["user_id"], r["target"]): r["history"] for r in _rows(run_dir, "train")}
    samples = _samples(run_dir)
    for s in samples:
        if s["task"] in ("sequential", "negative"):
            history = train[(s["user_id"], s["item_id"])]
            assert ", ".join(_render(scheme, i) for i in history[-2:]) in s["prompt"]
            if len(history) > 2:
                assert _render(scheme, history[-3]) + ", " not in s["prompt"]
            assert ("user <user_" in s["prompt"]) == (scheme == "atomic")
            assert ("the user" in s["prompt"]) == (scheme != "atomic")
        if s["task"] != "text_alignment" or s["response"] == _render(scheme, s["item_id"]):
            assert s["response"] == _render(scheme, s["item_id"])
        else:
            assert _render(scheme, s["item_id"]) in s["prompt"]
    assert {s["task"] for s in samples} == set(DEFAULT_TASKS)


def test_same_seed_same_samples_other_seed_other_draws(toy_dataset, tmp_path):
    tables = {}
    for name, seed, tasks in (("a", 5, list(TASKS)), ("b", 5, list(TASKS)), ("c", 6, list(TASKS)),
                              ("d", 5, ["negative"])):
        run_dir = _with_ids(toy_dataset, tmp_path / name, "atomic")
        build_samples(SamplesConfig(tasks=tasks), str(run_dir), seed=seed)
        tables[name] = pq.read_table(run_dir / "samples" / "train").sort_by("sample_id")
    assert tables["a"].equals(tables["b"])
    assert tables["a"].column("sample_id").equals(tables["c"].column("sample_id"))
    assert tables["a"].column("prompt").to_pylist() != tables["c"].column("prompt").to_pylist()
    negatives = tables["a"].filter(pc.equal(tables["a"].column("task"), "negative"))
    assert negatives.equals(tables["d"])  # a task's samples do not depend on which other tasks run


def test_sample_ids_unique_and_shards_follow_the_hash(atomic_run):
    manifest = json.loads((atomic_run / "samples" / "manifest.json").read_text())
    ids = []
    for split in ("train", "valid"):
        for k in range(manifest["num_shards"]):
            part = pq.read_table(atomic_run / "samples" / split / f"part-{k:05d}.parquet")
            assert part.schema.field("user_id").type == pa.int64() and part.schema.field("sample_id").type == pa.int64()
            for r in part.to_pylist():
                key = r["user_id"] if r["user_id"] is not None else r["item_id"]
                assert user_shard(np.array([key]), manifest["num_shards"])[0] == k
                ids.append(r["sample_id"])
    assert len(ids) == len(set(ids)) == manifest["counts"]["train"]["total"] + manifest["counts"]["valid"]["sequential"]
    assert manifest["config"]["negative_ratio"] == 3 and manifest["scheme"] == "atomic" and manifest["seed"] == 0


def test_max_samples_per_task_keeps_a_subset_with_the_same_ids(atomic_run, toy_dataset, tmp_path):
    run_dir = _with_ids(toy_dataset, tmp_path, "atomic")
    manifest = build_samples(SamplesConfig(max_samples_per_task=7), str(run_dir), seed=0)
    assert all(n == 7 for t, n in manifest["counts"]["train"].items() if t != "total")
    full = {s["sample_id"]: s for s in _samples(atomic_run)}
    for s in _samples(run_dir):
        assert full[s["sample_id"]] == s


def test_missing_item_ids_fails_and_writes_nothing(toy_dataset, tmp_path):
    shutil.copytree(toy_dataset / "dataset", tmp_path / "dataset")
    with pytest.raises(DataError, match="build-ids"):
        build_samples(SamplesConfig(), str(tmp_path), seed=0)
    assert not (tmp_path / "samples").exists()


def test_config_problems_reported_together():
    problems = SamplesConfig(tasks=["sequential", "ranking"], negative_ratio=0, templates_per_task=9,
                             max_samples_per_task=0).check()
    text = "\n".join(problems)
    for needle in ("tasks: ['ranking'] not among", "negative_ratio: 0 must be > 0", "max_samples_per_task: 0",
                   "templates_per_task: 9 but sequential/next_item has only 6"):
        assert needle in text, text


def test_build_samples_stage_from_the_command_line(toy_dataset, tmp_path):
    run_dir = _with_ids(toy_dataset, tmp_path, "semantic")
    rc = main(["build-samples", str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={run_dir}",
               "samples.tasks=sequential,text_alignment", "samples.seed=4"])
    assert rc == 0
    manifest = json.loads((run_dir / "samples" / "manifest.json").read_text())
    assert set(manifest["counts"]["train"]) == {"sequential", "text_alignment", "total"} and manifest["seed"] == 4
