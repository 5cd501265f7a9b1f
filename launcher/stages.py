"""The stages of the flow, in order, each a function of the composed config; `pipeline` runs them in turn."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("recllm")


def prepare(cfg) -> None:
    from data_pipeline.config_schema import ConfigError
    from data_pipeline.prepare import run_prepare

    if cfg.data.source_problems():  # `recllm prepare` on a config whose stages do not list it
        raise ConfigError(cfg.data.source_problems())
    manifest = run_prepare(cfg.data, cfg.run_dir)
    c = manifest["counts"]
    print(f"dataset: {c['users']} users, {c['items']} items, {c['interactions']} interactions; "
          f"rows train={c['train_rows']} valid={c['valid_rows']} test={c['test_rows']} -> {cfg.run_dir}/dataset")


def train_baseline(cfg) -> None:
    from trainers.baseline import run_train_baseline

    manifest = run_train_baseline(cfg.baseline, cfg.run_dir, seed=cfg.seed)
    valid = manifest["valid"]
    print(f"baseline: SASRec, {len(manifest['losses'])} epochs (best {manifest['best_epoch']}), valid HR@10 "
          f"{valid.get('HR@10', float('nan')):.4f} NDCG@10 {valid.get('NDCG@10', float('nan')):.4f}, "
          f"{manifest['train_seconds']}s -> {cfg.run_dir}/baseline")


def build_ids(cfg) -> None:
    """The data stage gets what comes from a model: the LM's tokenizer (subtoken), its text embedder (semantic's
    LLM alignment, built on first use) and the settings its baseline must have been trained with (semantic, and
    subtoken with collaborative numbers)."""
    from data_pipeline.baseline_files import baseline_settings
    from data_pipeline.item_ids.build_ids import run_build_ids
    from trainers.lm_text_embedder import lm_text_embedder
    from trainers.lm_text_vectors import lm_text_encoder, reader_fingerprint
    from trainers.models import load_tokenizer

    ids, text = cfg.ids, cfg.text
    stats = run_build_ids(ids, cfg.run_dir, seed=cfg.seed,
                          tokenizer=load_tokenizer(cfg.model) if ids.scheme == "subtoken" else None,
                          text_embedder=lm_text_embedder(cfg.model, ids.llm_alignment_max_tokens),
                          baseline_settings=baseline_settings(cfg.baseline, cfg.seed), text=text,
                          text_encoder=lm_text_encoder(text.reader, text.checkpoint, text.layer, text.max_tokens,
                                                       text.batch_size),
                          reader_id=lambda: reader_fingerprint(text.reader, text.checkpoint))
    after = stats.get("collisions", {}).get("after", {}).get("duplicate_codes", 0)
    text_vectors = stats.get("text_vectors", {})
    text_note = ""
    if text_vectors.get("used"):
        how = "cached" if text_vectors["cache_hit"] else f"read in {text_vectors['seconds']}s"
        text_note = f", text vectors of {text_vectors['items_with_text']} items from {text_vectors['reader']} ({how})"
    elif text_vectors:
        text_note = f", text vectors {text_vectors['note']}"
    print(f"item ids: {stats['scheme']} scheme, {stats['items']} items, {stats['new_tokens']} new tokens, "
          f"{after} collisions{text_note}, {stats['total_seconds']}s -> {cfg.run_dir}/item_ids")


def build_samples(cfg) -> None:
    from data_pipeline.samples.build_samples import run_build_samples

    manifest = run_build_samples(cfg)
    counts = ", ".join(f"{t}={n}" for t, n in manifest["counts"]["train"].items())
    print(f"samples: {counts}; valid={manifest['counts']['valid']['sequential']}, {manifest['seconds']}s "
          f"-> {cfg.run_dir}/samples")


def train(cfg) -> None:
    from trainers.ray_launch import run_training

    out = run_training(cfg)
    m = out["metrics"] or {}
    print(f"trained {m.get('step')} steps, loss {m.get('loss', float('nan')):.4f}, "
          f"{m.get('tokens_per_s', 0):.0f} tokens/s -> {out['model_dir']}")


def _new_token_count(cfg) -> tuple[int, str]:
    """How many tokens build-ids adds (or added): read tokens.json when it exists, else estimate."""
    import json

    from data_pipeline import storage
    from data_pipeline.run_layout import RunLayout

    def readable(uri: str) -> bool:  # the dry run must work where run_dir is out of reach (no S3 credentials here)
        try:
            return storage.exists(uri)
        except Exception as exc:  # noqa: BLE001 - botocore, fsspec and OS errors alike mean "cannot tell"
            log.warning("plan: cannot read %s (%s); estimating instead", uri, type(exc).__name__)
            return False

    layout = RunLayout(cfg.run_dir)
    tokens = layout.tokens
    if readable(tokens):
        return len(json.loads(storage.read_text(tokens))), tokens
    if cfg.ids.scheme in ("semantic", "precomputed"):
        return cfg.ids.levels * cfg.ids.codes, f"{cfg.ids.levels} levels x {cfg.ids.codes} codes"
    if cfg.ids.scheme == "atomic":
        manifest = layout.dataset_manifest
        if readable(manifest):
            c = json.loads(storage.read_text(manifest))["counts"]
            if cfg.ids.user_tokens:
                return c["items"] + c["users"], "one per item and user"
            return c["items"], "one per item"
        return 0, "atomic: unknown until `recllm prepare` (0 assumed)"
    return 0, "subtoken: no new tokens"


def plan(cfg) -> None:
    """The packed language-model run's plan, or, for a recipe whose ``memory_workloads`` lists its runs (LoID),
    the plan of each run it trains: the largest is shown and checked."""
    from trainers.memory_plan import GIB, check_plan, plan_memory
    from trainers.recipes.registry import objective_class

    workloads = objective_class(cfg.train.objective).memory_workloads(cfg)
    if workloads is None:
        count, source = _new_token_count(cfg)
        plans, sources = [plan_memory(cfg, count)], f"new tokens: {count:,} ({source})"
    else:
        plans = [plan_memory(cfg, 0, workload=w) for w in workloads]
        sources = "; ".join([f"new tokens: {plans[0].new_tokens:,}", *dict.fromkeys(w.note for w in workloads)])
    largest = max(plans, key=lambda p: p.total)
    print(f"config valid; {sources}")
    if len(plans) > 1:
        print(f"{len(plans)} {largest.workload.recipe} runs, per GPU: " +
              ", ".join(f"{p.workload.run} {p.total / GIB:.2f} GiB" for p in plans) + "; the largest:")
    print(largest.table())
    if workloads is None:  # a packed LM serves a nightly top-K: its capacity
        print("\n".join(_infer_plan(cfg, count).lines()))
    check_plan(largest, cfg)


def _infer_plan(cfg, new_tokens: int):
    """The nightly infer's capacity plan for the configured model (inference/capacity_plan.py)."""
    from inference.capacity_plan import plan_infer
    from trainers.memory_plan import model_shape

    label, config = model_shape(cfg.model)
    items = cfg.infer.plan_items or _catalogue_size(cfg) or new_tokens
    return plan_infer(cfg, cfg.model.size if cfg.model.size != "auto" else label, config, items, new_tokens)


def _catalogue_size(cfg) -> int:
    """Items of the prepared dataset, or 0 when it is not there (yet) or out of reach."""
    import json

    from data_pipeline import storage
    from data_pipeline.run_layout import RunLayout

    manifest = RunLayout(cfg.run_dir).dataset_manifest
    try:
        return json.loads(storage.read_text(manifest))["counts"]["items"] if storage.exists(manifest) else 0
    except Exception:  # noqa: BLE001 - the dry run must work where run_dir is out of reach
        return 0


def infer(cfg) -> None:
    from inference.ray_infer import run_infer

    s = run_infer(cfg)
    print(f"top-K: {s['users']} users in {len(s['shards'])} shards ({s['shards_computed']} computed, "
          f"{s['users_scored']} users scored, {s['users_reused']} reused) in {s['seconds']}s "
          f"-> {cfg.run_dir}/topk")


def evaluate(cfg) -> None:
    from inference.evaluate import run_evaluate

    report = run_evaluate(cfg)
    k = max(cfg.eval.ks)  # the widest cut-off computed; NDCG@1 equals HR@1 and is not stored
    for name, m in report["models"].items():
        print(f"{name:8s} HR@{k} {m[f'HR@{k}']:.4f}  NDCG@{k} {m.get(f'NDCG@{k}', m[f'HR@{k}']):.4f}  "
              f"invalid {m['invalid_item_rate']:.4f}")
    print(f"report: {cfg.run_dir}/report/report.md")


def build_reviews(cfg) -> None:
    from data_pipeline.reviews.build_reviews import run_build_reviews

    for domain, c in run_build_reviews(cfg.reviews, cfg.run_dir).items():
        print(f"reviews {domain}: {c['reviews']} reviews ({c['users']} users, {c['items']} items), "
              f"train={c['train']} valid={c['valid']} test={c['test']} -> {cfg.run_dir}/domains/{domain}/reviews")


def train_loid(cfg) -> None:
    """Every planned LoID run in order (source plugins, then the target variants), each through `run_training`."""
    import json
    from pathlib import Path

    from data_pipeline.config_schema import ConfigError, validate_tree
    from trainers.loid.objective import planned_runs, run_config
    from trainers.ray_launch import run_training

    runs = [run_config(cfg, run["name"]) for run in planned_runs(cfg)]  # every run's config checked before Ray
    problems = sorted({p for run in runs for p in validate_tree(run)})
    if problems:
        raise ConfigError(problems)
    for run in runs:
        out = run_training(run)
        info = json.loads((Path(out["model_dir"]) / "run.json").read_text())
        print(f"loid {run.loid.run}: {info['steps']} steps, loss {info['loss']:.4f} -> {out['model_dir']}")


def evaluate_loid(cfg) -> None:
    from trainers.loid.evaluate import run_evaluate_loid

    report = run_evaluate_loid(cfg)
    for name, m in report["models"].items():
        print(f"{name:22s} test MSE {m['test_mse']:.4f}  RMSE {m['test_rmse']:.4f}")
    print(f"report: {cfg.run_dir}/report/loid/report.md")


def build_review_samples(cfg) -> None:
    from data_pipeline.reviews.review_samples import run_build_review_samples

    m = run_build_review_samples(cfg)
    print(f"review samples: train {m['counts']['train']}, test {m['counts']['test']} -> {cfg.run_dir}/samples")


def evaluate_reviews(cfg) -> None:
    from inference.review_tasks import run_evaluate_reviews

    report = run_evaluate_reviews(cfg)
    for task, scores in report["tasks"].items():
        print(f"{task:22s} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in scores.items()))
    print(f"report: {cfg.run_dir}/report/review_tasks/report.md")


STAGES: dict[str, Callable] = {"prepare": prepare, "train-baseline": train_baseline, "build-ids": build_ids,
                               "build-samples": build_samples,
                               "train": train, "infer": infer, "evaluate": evaluate,
                               "build-reviews": build_reviews, "train-loid": train_loid,
                               "evaluate-loid": evaluate_loid, "build-review-samples": build_review_samples,
                               "evaluate-reviews": evaluate_reviews}


def pipeline(cfg) -> None:
    for name in cfg.stages:
        print(f"stage {name}", flush=True)
        STAGES[name](cfg)
