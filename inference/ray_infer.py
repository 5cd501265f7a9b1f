"""`recllm infer`: the one inference module that speaks to Ray. Plans user shards, skips the complete ones,
and streams the rest through a Ray Data actor pool of model replicas (one GPU each, or fractional CPUs); each
replica scores its shard, reusing last run's rows for users whose history did not change, and writes it
atomically into the staging folder. `_SUCCESS` closes the run, and the staging folder then replaces topk/ whole:
topk/ is always the last complete run, whatever happens to this one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import time

import numpy as np

from data_pipeline import storage
from data_pipeline.item_ids.item_codes import read_item_ids_checked
from data_pipeline.baseline_files import dataset_fingerprint
from data_pipeline.errors import DataError, WriteError
from data_pipeline.run_layout import RunLayout
from data_pipeline.samples.prompt_format import PromptFormat
from inference import topk_shards as ts
from trainers.model_files import check_trained_model, read_model_config

MISSING_MODEL = "no model (config.json); run `recllm train` first, or set infer.model_dir"

log = logging.getLogger("recllm.infer")


def _items_version(layout: RunLayout) -> str:
    """Digest of item_ids/'s files (their sha256 in stats.json): items added to the catalogue change it, so no
    user's row from before is reused as if the catalogue were the same."""
    files = storage.read_json(layout.item_ids_stats, "no item_ids/; run `recllm build-ids` first").get("files", {})
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _settings(icfg, model_version: str, items_version: str) -> str:
    keys = {"mode": icfg.mode, "scorer": icfg.scorer, "top_k": icfg.top_k, "num_beams": icfg.num_beams,
            "exclude_seen": icfg.exclude_seen, "max_history": icfg.max_history, "model_version": model_version,
            "items_version": items_version}
    if icfg.text_weight is not None:  # a run with item text vectors: its weight and query change the lists
        keys.update(text_weight=icfg.text_weight, text_history=icfg.text_history,
                    text_untrained_bias=icfg.text_untrained_bias)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class ShardWorker:
    """One model replica in the actor pool; called with batches of shard descriptors."""

    def __init__(self, run_dir: str, model_dir: str, icfg, users, num_items: int, num_users: int, settings: str,
                 recent: set[int] | None):
        import ray

        from ranking.topk_scorer import TopKScorer

        device = "cuda" if icfg.use_gpu else "cpu"
        self.scorer = TopKScorer.from_model_dir(run_dir, model_dir, icfg.scorer_settings(), num_items, num_users,
                                                device)
        self.users: ts.UserHistories = ray.get(users)  # zero-copy views of the driver's one copy in the object store
        self.topk_dir = RunLayout(run_dir).topk  # the last complete run: rows to reuse
        self.stage_dir = ts.staging_dir(self.topk_dir)  # this run's shards
        self.settings, self.recent = settings, recent
        self.failed = ""

    def __call__(self, batch: dict) -> dict:
        """Score and write the batch's shards. A user's error (a full disk, bad input) comes back as the batch's
        ``error`` (pickled) rather than raised: Ray Data would wrap it in its own exception and lose it, and the
        CLI could not print it as one line. Once failed, the replica skips its remaining shards."""
        out = {"shard": [], "users": [], "scored": [], "reused": [], "seconds": [], "error": []}
        if not self.failed:
            try:
                self._score(batch, out)
            except (DataError, WriteError) as exc:
                self.failed = base64.b64encode(pickle.dumps(exc)).decode()
        if self.failed:
            out = {key: [] for key in out}
            for key in ("shard", "users", "scored", "reused", "seconds"):
                out[key].append(-1 if key == "shard" else 0)
            out["error"].append(self.failed)
        return {k: np.asarray(v) for k, v in out.items()}

    def _score(self, batch: dict, out: dict) -> None:
        for shard, lo, hi, fingerprint in zip(batch["shard"], batch["lo"], batch["hi"], batch["fingerprint"]):
            t0 = time.perf_counter()
            task = ts.ShardTask(int(shard), int(lo), int(hi), str(fingerprint))
            user_ids, histories = self.users.slice(task.lo, task.hi)
            hashes = [ts.history_hash(h) for h in histories]
            items = np.full((len(user_ids), self.scorer.settings.top_k), -1, dtype=np.int64)
            scores = np.full(items.shape, -np.inf, dtype=np.float32)
            todo = self._reuse(task.shard, user_ids, hashes, items, scores)
            if len(todo):
                got_items, got_scores = self.scorer.score(user_ids[todo], [histories[i] for i in todo])
                items[todo, :got_items.shape[1]] = got_items
                scores[todo, :got_scores.shape[1]] = got_scores
            ts.write_shard(self.stage_dir, task, user_ids, histories, items, scores, self.scorer.model_version,
                           self.settings, unpublished(self.topk_dir))
            for key, value in (("shard", task.shard), ("users", len(user_ids)), ("scored", len(todo)),
                               ("reused", len(user_ids) - len(todo)), ("seconds", time.perf_counter() - t0),
                               ("error", "")):
                out[key].append(value)

    def _reuse(self, shard: int, user_ids, hashes, items, scores) -> np.ndarray:
        """Fill rows from last run's shard where the user's history (and the settings) are unchanged;
        return the rows that still need scoring."""
        previous = ts.read_shard(self.topk_dir, shard)
        meta = (previous.schema.metadata or {}) if previous is not None else {}
        if previous is None or meta.get(b"recllm_settings", b"").decode() != self.settings:
            return np.arange(len(user_ids))
        old = {u: (h, i, s) for u, h, i, s in zip(previous.column("user_id").to_pylist(),
                                                 previous.column("history_hash").to_pylist(),
                                                 previous.column("item_ids").to_pylist(),
                                                 previous.column("scores").to_pylist())}
        todo = []
        for row, (user, digest) in enumerate(zip(user_ids.tolist(), hashes)):
            prev = old.get(user)
            changed = prev is None or prev[0] != digest
            if self.recent is not None and prev is not None:
                changed = user in self.recent  # since= given: trust it, rescore only recent users
            if changed:
                todo.append(row)
            else:
                k = len(prev[1])
                items[row, :k], scores[row, :k] = prev[1], prev[2]
        return np.asarray(todo, dtype=np.int64)


def unpublished(topk_dir: str) -> str:
    """What a failed write in the staging folder means for the user (the end of its one-line error)."""
    return f"; nothing was published, {topk_dir} is as it was"


def check_inputs(run_dir: str, model_dir: str, scorer: str = "beam") -> None:
    """Everything the replicas will read, checked here before Ray starts: the model folder (family, weights,
    vocabulary), item_ids/ (one build, the item codes there) and the prompt format saved with the model."""
    read_model_config(model_dir, MISSING_MODEL)
    layout = RunLayout(run_dir)
    codes, tokens = read_item_ids_checked(layout.item_ids)
    if codes is None:
        layout.read_item_codes()  # raises: infer names items by their codes
    new_items_from_text = scorer == "multinomial" and storage.exists(layout.text_vectors)
    check_trained_model(model_dir, tokens, layout.tokens, new_items_from_text)
    PromptFormat.load(model_dir)


def run_infer(cfg) -> dict:
    icfg = cfg.infer
    run_dir = cfg.run_dir if "://" in cfg.run_dir else os.path.abspath(cfg.run_dir)
    layout = RunLayout(run_dir)
    model_dir = icfg.model_dir or layout.model
    check_inputs(run_dir, model_dir, icfg.scorer)  # before Ray is even imported

    import ray

    from ranking.topk_scorer import _model_version

    topk_dir = layout.topk
    manifest = layout.read_manifest()
    users = ts.users_to_score(run_dir, icfg.mode)
    recent = ts.recent_users(run_dir, icfg.since) if icfg.since is not None else None
    model_version = _model_version(model_dir)
    text_sweep: dict = {}
    if (icfg.scorer == "multinomial" and storage.exists(layout.text_vectors)
            and (icfg.text_weight is None or icfg.text_untrained_bias is None)):
        from inference.text_weight import choose_text_weight

        weight, bias, text_sweep = choose_text_weight(cfg, model_dir, manifest["counts"]["items"],
                                                      manifest["counts"]["users"])
        icfg = dataclasses.replace(icfg, text_weight=weight, text_untrained_bias=bias)
    settings = _settings(icfg, model_version, _items_version(layout))
    tasks = ts.plan_shards(users, icfg.users_per_shard, settings)
    publisher = storage.StagedFolder(topk_dir)
    publisher.clear_leftovers()  # a previous topk/ that a killed fallback publish moved aside is put back
    stage_dir = ts.staging_dir(topk_dir)
    ts.clear_success(stage_dir)
    ts.remove_stale_temporaries(stage_dir)
    staged, published = ts.complete_shards(stage_dir), ts.complete_shards(topk_dir)
    todo = []
    for t in tasks:
        if staged.get(t.shard) == t.fingerprint:  # finished by a run that was killed before publishing
            continue
        if published.get(t.shard) == t.fingerprint:  # unchanged since the last complete run
            ts.adopt_shard(topk_dir, stage_dir, t.shard, unpublished(topk_dir))
            continue
        todo.append(t)
    num_users = len(users)
    log.info("%d users in %d shards; %d complete, %d to score", num_users, len(tasks), len(tasks) - len(todo),
             len(todo))
    results: list[dict] = []
    t0 = time.perf_counter()
    if todo:
        from data_pipeline.ray_session import connect_ray

        connect_ray()
        ctx = ray.data.DataContext.get_current()
        ctx.op_resource_reservation_enabled = False
        items = [{"shard": t.shard, "lo": t.lo, "hi": t.hi, "fingerprint": t.fingerprint} for t in todo]
        users_ref = ray.put(users)  # the replicas share this copy rather than each reading every history again
        del users  # and so does the driver: from here on it needs only the shard plan
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWorker, batch_size=1, concurrency=min(icfg.num_replicas, len(items)),
            num_cpus=icfg.cpus_per_replica, num_gpus=1 if icfg.use_gpu else 0,
            fn_constructor_kwargs={"run_dir": run_dir, "model_dir": model_dir, "icfg": icfg, "users": users_ref,
                                   "num_items": manifest["counts"]["items"], "num_users": manifest["counts"]["users"],
                                   "settings": settings, "recent": recent})
        results = ds.take_all()
        failed = sorted(r["error"] for r in results if r["error"])
        if failed:  # the replica's own error, raised here as itself
            raise pickle.loads(base64.b64decode(failed[0]))
    live = {ts.shard_name(t.shard) for t in tasks}
    for uri in storage.list_files(stage_dir, ".parquet"):  # users gone from the data: drop their old shards
        if uri.rsplit("/", 1)[-1] not in live:
            fs, path = storage.filesystem(uri)
            fs.rm(path)
    seconds = time.perf_counter() - t0
    scored = int(sum(r["scored"] for r in results))
    summary = {"mode": icfg.mode, "dataset_sha256": dataset_fingerprint(run_dir), "model_version": model_version,
               "settings": settings, "users": num_users,
               "shards": {ts.shard_name(t.shard): t.fingerprint for t in tasks},
               "shards_computed": len(todo), "users_scored": scored,
               "users_reused": int(sum(r["reused"] for r in results)), "seconds": round(seconds, 2),
               "users_per_second": round(scored / seconds, 2) if scored else None,
               "scorer": icfg.scorer, "top_k": icfg.top_k, "num_beams": icfg.num_beams}
    if icfg.text_weight is not None:
        summary["text"] = {"weight": icfg.text_weight, "history": icfg.text_history,
                           "untrained_bias": icfg.text_untrained_bias,
                           "valid_ndcg10_by_weight_bias": {k: round(v, 5) for k, v in text_sweep.items()}}
    ts.write_success(stage_dir, summary, unpublished(topk_dir))
    publish_staged(publisher, stage_dir)
    return summary


def publish_staged(publisher: storage.StagedFolder, stage_dir: str) -> None:
    """Swap the complete staging folder in as topk/ (one rename locally; on S3 a copy, `_SUCCESS` last)."""
    publisher.adopt(storage.filesystem(stage_dir)[1])
    publisher.publish()
