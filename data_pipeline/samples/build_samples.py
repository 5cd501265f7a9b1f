"""Stage 3 of the flow: run_dir/dataset/ + run_dir/item_ids/ -> run_dir/samples/ (what the trainer fine-tunes on).

samples/train/part-*.parquet holds every task's samples (sharded by the user_id hash, item_id for user-less
tasks), samples/valid/ the sequential task on sequences/valid rows for evaluation loss, and manifest.json the
counts per task and the config used. Training samples come from sequences/train only, so no valid or test
target reaches them. One staged folder: a failed run leaves no samples/.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time

import numpy as np
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.item_ids.atomic_ids import content_twin
from data_pipeline.item_ids.item_codes import item_ids_files
from data_pipeline.run_layout import (INTERACTIONS_DIR, ITEM_CODES_FILE, MANIFEST_FILE, STATS_FILE, TOKENS_FILE,
                                      RunLayout, read_new_tokens, read_sequences)
from data_pipeline.samples.config import TASKS, SamplesConfig
from data_pipeline.samples.item_rendering import clean_text, item_names, read_item_ids, user_names
from data_pipeline.samples.prompt_templates import templates_in_use
from data_pipeline.samples.tasks import (ItemText, SequenceRows, TaskSamples, collaborative_lm_samples,
                                         content_lm_samples, negative_samples, query_alignment_samples,
                                         sequential_samples, text_alignment_samples, user_documents,
                                         user_sequence_samples)
from data_pipeline.sharding import user_shard

log = logging.getLogger("recllm.samples")

SCHEMA_VERSION = 1
SAMPLE_SCHEMA = pa.schema([("sample_id", pa.int64()), ("task", pa.string()), ("prompt", pa.string()),
                           ("response", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64())])
TASK_CODES = {"sequential": 1, "text_alignment": 2, "query_alignment": 3, "negative": 4, "collaborative_lm": 5,
              "content_lm": 6, "user_sequence": 7}
VALID_CODE = 15
ID_BITS = 40
"""sample_id = task code << 40 | index of the sample in its task's generation order: unique across tasks and
splits, and the same for a seed whatever other tasks are on and whatever max_samples_per_task keeps."""


def sequence_rows(dataset_dir: str, split: str) -> SequenceRows:
    table = read_sequences(dataset_dir, split)
    order = np.argsort(table.column("user_id").to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    return SequenceRows(table.column("user_id").to_numpy(), table.column("history").to_pylist(),
                        table.column("target").to_numpy())


def read_item_text(items: pa.Table) -> ItemText:
    return ItemText(*(clean_text(items.column(name)) for name in ("title", "description", "brand", "categories")))


def interacted_items(dataset_dir: str) -> dict[int, frozenset[int]]:
    """Every item each user interacted with, in any split (negatives must avoid valid/test items too)."""
    inter = storage.read_parquet(storage.join(dataset_dir, INTERACTIONS_DIR), columns=["user_id", "item_id"])
    users, items = inter.column("user_id").to_numpy(), inter.column("item_id").to_numpy()
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], int)
    return {int(users[s]): frozenset(chunk.tolist()) for s, chunk in zip(starts, np.split(items, starts[1:]))}


def train_reviews(dataset_dir: str, rows: SequenceRows) -> list[tuple[int, int, str]]:
    """(user, item, review text) of the interactions in the train split only, when the dataset kept reviews."""
    inter = storage.read_parquet(storage.join(dataset_dir, INTERACTIONS_DIR))
    if "review" not in inter.column_names or inter.column("review").null_count == inter.num_rows:
        return []
    train_pairs = {(u, i) for u, items in user_documents(rows).items() for i in items}
    out = []
    for u, i, text in zip(inter.column("user_id").to_pylist(), inter.column("item_id").to_pylist(),
                          inter.column("review").to_pylist()):
        if text and text.strip() and (u, i) in train_pairs:
            out.append((u, i, text.strip()))
    return sorted(out)


def content_names(names: list[str], users: list[str], tokens: list[str]) -> tuple[list[str], list[str]]:
    """The names the content LM uses: the content twins (<text_item_N>) when build-ids added them, else the
    collaborative names themselves (embeddings shared instead of tied by regularization)."""
    vocab = set(tokens)
    if not names or content_twin(names[0]) not in vocab:
        return names, users
    return ([content_twin(n) for n in names],
            [" ".join(content_twin(w) if w.startswith("<user_") else w for w in u.split()) for u in users])


def to_table(task: str, samples: TaskSamples, code: int, keep: np.ndarray | None) -> pa.Table:
    ids = (np.int64(code) << np.int64(ID_BITS)) + np.arange(len(samples), dtype=np.int64)
    table = pa.table({"sample_id": ids, "task": pa.array([task] * len(samples), pa.string()),
                      "prompt": pa.array(samples.prompts, pa.string()),
                      "response": pa.array(samples.responses, pa.string()),
                      "user_id": pa.array(samples.user_ids, pa.int64()),
                      "item_id": pa.array(samples.item_ids, pa.int64())}, schema=SAMPLE_SCHEMA)
    return table.take(pa.array(keep)) if keep is not None else table


def _subset(n: int, cap: int | None, seed: int, code: int) -> np.ndarray | None:
    if cap is None or n <= cap:
        return None
    return np.sort(np.random.default_rng([seed, code, 1]).choice(n, size=cap, replace=False))


def write_sharded(staged: storage.StagedFolder, rel_dir: str, table: pa.Table, cfg: SamplesConfig, seed: int) -> None:
    """Shard by the user hash of prepare; user-less rows (text and query alignment) hash their item_id."""
    users = table.column("user_id")
    key = np.where(users.is_null().to_numpy(zero_copy_only=False), table.column("item_id").to_numpy(),
                   users.fill_null(0).to_numpy())
    shard = user_shard(key, cfg.num_shards)
    for k in range(cfg.num_shards):
        part = table.filter(pa.array(shard == k))
        # Rows are shuffled once here (seeded) so every row group mixes the tasks: the streaming reader
        # only permutes row groups and the rows inside each one.
        part = part.take(pa.array(np.random.default_rng([seed, k]).permutation(part.num_rows)))
        staged.write_parquet(f"{rel_dir}/part-{k:05d}.parquet", part, cfg.row_group_size)


def _item_ids_stats(item_ids_dir: str) -> dict:
    """item_ids/stats.json (scheme, and the sha256 of every file build-ids wrote); {} where there is none."""
    uri = storage.join(item_ids_dir, STATS_FILE)
    return storage.read_json(uri) if storage.exists(uri) else {}


def build_samples(cfg: SamplesConfig, run_dir: str, seed: int, scheme: str | None = None) -> dict:
    """Build run_dir/samples/ from run_dir/dataset/ and run_dir/item_ids/; returns the manifest."""
    start = time.perf_counter()
    layout = RunLayout(run_dir)
    dataset_dir, ids_dir = layout.dataset, layout.item_ids
    dataset_manifest = layout.read_manifest()
    ids_stats = _item_ids_stats(ids_dir)
    items = storage.read_parquet(layout.items).sort_by("item_id")
    num_users = int(dataset_manifest["counts"]["users"])
    item_codes, user_codes = read_item_ids(ids_dir, with_users=cfg.user_tokens)
    names = item_names(item_codes, items.num_rows, storage.join(ids_dir, ITEM_CODES_FILE))
    users = user_names(user_codes, num_users)
    text = read_item_text(items)
    train = sequence_rows(dataset_dir, "train")

    tasks: dict[str, TaskSamples] = {}
    notes: dict[str, str] = {}
    for task in [t for t in TASKS if t in cfg.tasks]:
        reviews = train_reviews(dataset_dir, train) if task == "content_lm" else []
        if task in ("text_alignment", "query_alignment", "content_lm") and not text.has_text and not reviews:
            notes[task] = "skipped: the dataset has no item text"
            log.info("%s skipped: the dataset has no item titles or descriptions", task)
            continue
        rng = np.random.default_rng([seed, TASK_CODES[task]])
        templates = templates_in_use(task, cfg.templates_per_task)
        if task == "sequential":
            tasks[task] = sequential_samples(train, names, users, templates["next_item"], rng, cfg.max_history_in_prompt)
        elif task == "text_alignment":
            tasks[task] = text_alignment_samples(text, names, templates, rng, cfg.max_description_words)
        elif task == "query_alignment":
            tasks[task] = query_alignment_samples(text, names, templates, rng, cfg.query_phrase_words)
        elif task == "collaborative_lm":
            tasks[task] = collaborative_lm_samples(train, names, users, templates["item_document"], rng,
                                                   cfg.max_history_in_prompt)
        elif task == "user_sequence":
            tasks[task] = user_sequence_samples(train, names, cfg.max_sequence_items)
        elif task == "content_lm":
            tokens = read_new_tokens(ids_dir) if storage.exists(storage.join(ids_dir, TOKENS_FILE)) else []
            c_names, c_users = content_names(names, users, tokens)
            tasks[task] = content_lm_samples(text, reviews, c_names, c_users, templates, rng,
                                             cfg.max_description_words)
        else:
            tasks[task] = negative_samples(train, names, users, interacted_items(dataset_dir), items.num_rows,
                                           templates["not_interested"], rng, cfg.negative_ratio,
                                           cfg.max_history_in_prompt)
    # Valid prompts all use the first template, so evaluation loss does not move with the template draw.
    valid = sequential_samples(sequence_rows(dataset_dir, "valid"), names, users,
                               templates_in_use("sequential", cfg.templates_per_task)["next_item"], None,
                               cfg.max_history_in_prompt, desc="samples: valid")

    tables = [to_table(task, s, TASK_CODES[task], _subset(len(s), cfg.max_samples_per_task, seed, TASK_CODES[task]))
              for task, s in tasks.items()]
    train_table = pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
    valid_keep = _subset(len(valid), cfg.max_samples_per_task, seed, VALID_CODE)
    valid_table = to_table("sequential", valid, VALID_CODE, valid_keep)
    out = layout.samples
    with storage.staged_folder(out) as staged:
        write_sharded(staged, "train", train_table, cfg, seed)
        write_sharded(staged, "valid", valid_table, cfg, seed)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "scheme": ids_stats.get("scheme", scheme),
            "seed": seed,
            "item_ids": item_ids_files(ids_stats),
            "config": dataclasses.asdict(cfg),
            "counts": {"train": {t: tb.num_rows for t, tb in zip(tasks, tables)} | {"total": train_table.num_rows},
                       "valid": {"sequential": valid_table.num_rows}},
            "generated": {t: len(s) for t, s in tasks.items()},
            "skipped": {t: s.skipped for t, s in tasks.items() if s.skipped},
            "notes": notes,
            "templates": {t: {v: len(ts) for v, ts in templates_in_use(t, cfg.templates_per_task).items()}
                          for t in tasks},
            "user_tokens": user_codes is not None,
            "num_shards": cfg.num_shards,
            "seconds": round(time.perf_counter() - start, 2),
            "files": dict(sorted(staged.files.items())),
        }
        staged.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    log.info("wrote %s: %s train samples (%s), %d valid, in %.1fs", out, train_table.num_rows,
             ", ".join(f"{t}={n}" for t, n in manifest["counts"]["train"].items() if t != "total"),
             valid_table.num_rows, manifest["seconds"])
    return manifest


def run_build_samples(cfg) -> dict:
    """The stage: ``cfg`` is the composed RecllmConfig (run_dir, seed, samples; ids.scheme when item_ids/ has no stats)."""
    seed = cfg.samples.seed if cfg.samples.seed is not None else cfg.seed
    ids = getattr(cfg, "ids", None)
    return build_samples(cfg.samples, cfg.run_dir, seed, scheme=getattr(ids, "scheme", None))
