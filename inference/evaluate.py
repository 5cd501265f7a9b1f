"""`recllm evaluate`: the last stage. Full-ranking HR@K / NDCG@K of the top-K cache against the test targets,
invalid-item rate and catalogue coverage, next to most-popular, the run's SASRec baseline (read from
run_dir/baseline/, which `recllm train-baseline` writes; evaluate never trains one) and, when items have text, the
TF-IDF content baseline, all scored on the same split. With cold items held out (``data.cold_items``) every model
is also scored on the users whose target is a warm item and on those whose target is a cold one. Writes
run_dir/report/ (metrics.json, report.md, PNG plots).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.baseline_files import baseline_dir, baseline_settings, dataset_fingerprint, read_baseline
from data_pipeline.errors import DataError
from data_pipeline.run_layout import RunLayout
from ranking.ranking_metrics import ranking_metrics
from inference.topk_shards import SUCCESS

log = logging.getLogger("recllm.evaluate")


def read_topk(topk_dir: str, run_dir: str, test_users: list[int]) -> tuple[dict, pa.Table]:
    """The top-K cache's _SUCCESS and rows, refused unless it is a complete test-mode run on this dataset: a
    cache copied from another dataset (or made before `prepare` ran again) would be scored against targets it
    never saw."""
    success = storage.join(topk_dir, SUCCESS)
    manifest = storage.read_json(success, "no complete top-K run; run `recllm infer` first")
    if manifest.get("mode") != "test":
        raise DataError(success, f"a top-K run of mode {manifest.get('mode')!r}; evaluation needs infer.mode=test",
                        field="mode")
    here = dataset_fingerprint(run_dir)
    if manifest.get("dataset_sha256", here) != here:
        raise DataError(success, f"top-K of another dataset ({manifest['dataset_sha256'][:12]}..., this run_dir's "
                                 f"is {here[:12]}...); re-run `recllm infer`", field="dataset_sha256")
    topk = storage.read_parquet(topk_dir, columns=["user_id", "item_ids"]).sort_by("user_id")
    if topk.column("user_id").to_pylist() != test_users:
        raise DataError(topk_dir, "the top-K cache and the test split hold different users; re-run `recllm infer`",
                        field="user_id")
    return manifest, topk


def topk_matrix(lists: list[list[int]], k: int) -> np.ndarray:
    out = np.full((len(lists), k), -1, dtype=np.int64)
    for r, items in enumerate(lists):
        items = items[:k]
        out[r, :len(items)] = items
    return out


def recllm_metrics(topk: np.ndarray, targets: np.ndarray, num_items: int, ks: list[int]) -> dict:
    metrics = ranking_metrics(topk, targets, ks)
    slots = topk.size
    valid = (topk >= 0) & (topk < num_items)
    duplicates = sum(len(row[row >= 0]) - len(np.unique(row[row >= 0])) for row in topk)
    metrics["invalid_item_rate"] = float(((topk >= num_items) | (topk < -1)).sum() + duplicates) / max(slots, 1)
    metrics["missing_rate"] = float((topk == -1).sum()) / max(slots, 1)
    metrics[f"Coverage@{topk.shape[1]}"] = float(len(np.unique(topk[valid]))) / num_items
    return metrics


def most_popular(train: pa.Table, k: int) -> np.ndarray:
    """The ``k`` items with most train interactions (each user's longest train row: history + target), the
    same list for every user: the floor a personalised recommender has to clear."""
    from data_pipeline.samples.tasks import SequenceRows, user_documents

    rows = SequenceRows(train.column("user_id").to_numpy(), train.column("history").to_pylist(),
                        train.column("target").to_numpy())
    items = np.fromiter((i for doc in user_documents(rows).values() for i in doc), np.int64)
    counts = np.bincount(items) if len(items) else np.zeros(1, np.int64)
    return np.argsort(-counts, kind="stable")[:k]


def content_baseline_topk(layout: RunLayout, histories: list[list[int]], k: int, ecfg, exclude_seen: bool) -> np.ndarray:
    """Top-``k`` of the TF-IDF content baseline (``ranking.content_baseline``) for each history."""
    from ranking.content_baseline import content_topk, item_documents, tfidf_item_vectors

    items = storage.read_parquet(layout.items).sort_by("item_id")
    documents = item_documents({f: items.column(f).to_pylist() for f in ecfg.content_fields}, ecfg.content_fields)
    return content_topk(tfidf_item_vectors(documents), histories, k, ecfg.content_history, exclude_seen)


def cold_item_mask(layout: RunLayout, num_items: int) -> np.ndarray | None:
    """Bool per item_id of the items `prepare` held out as new (``data.cold_items``); None when there are none."""
    items = storage.read_parquet(layout.items)
    if "cold" not in items.column_names:
        return None
    mask = np.zeros(num_items, dtype=bool)
    mask[items.column("item_id").to_numpy()] = items.column("cold").to_numpy(zero_copy_only=False)
    return mask if mask.any() else None


def group_metrics(lists: dict[str, np.ndarray], targets: np.ndarray, num_items: int, ks: list[int],
                  cold: np.ndarray) -> dict:
    """{"warm"|"cold": {"users", "models": {name: metrics}}}: each model scored on the users whose target is a
    warm (resp. cold) item only, so a group's row averages over its own users."""
    groups = {}
    for name, rows in (("warm", ~cold[targets]), ("cold", cold[targets])):
        groups[name] = {"users": int(rows.sum()),
                        "models": {m: recllm_metrics(top[rows], targets[rows], num_items, ks) if rows.any() else {}
                                   for m, top in lists.items()}}
    return groups


def run_evaluate(cfg) -> dict:
    from trainers.sasrec import load_sasrec, recommend_topk

    ecfg = cfg.eval
    run_dir = cfg.run_dir
    layout = RunLayout(run_dir)
    manifest = layout.read_manifest()
    num_items = manifest["counts"]["items"]
    test = layout.read_sequences("test").sort_by("user_id")
    targets = test.column("target").to_numpy()
    histories = test.column("history").to_pylist()
    kmax = max(ecfg.ks)

    topk_manifest, topk = read_topk(layout.topk, run_dir, test.column("user_id").to_pylist())
    baseline = read_baseline(run_dir, baseline_settings(cfg.baseline, cfg.seed)) if ecfg.baseline else None
    lists = {"recllm": topk_matrix(topk.column("item_ids").to_pylist(), kmax),
             "popular": np.tile(most_popular(layout.read_sequences("train"), kmax), (len(targets), 1))}
    seconds = {}
    if baseline is not None:
        t0 = time.perf_counter()
        base_items, _ = recommend_topk(load_sasrec(baseline_dir(run_dir)), histories, kmax,
                                       exclude_seen=cfg.infer.exclude_seen)
        lists["sasrec"] = base_items.numpy()
        seconds["sasrec"] = round(time.perf_counter() - t0, 1)
    if ecfg.content_baseline and manifest.get("has_text"):
        t0 = time.perf_counter()
        lists["content"] = content_baseline_topk(layout, histories, kmax, ecfg, cfg.infer.exclude_seen)
        seconds["content"] = round(time.perf_counter() - t0, 1)
    models = {name: recllm_metrics(top, targets, num_items, ecfg.ks) for name, top in lists.items()}
    models["recllm"]["users_per_second"] = topk_manifest.get("users_per_second")
    for name, s in seconds.items():
        models[name]["seconds"] = s

    report = {"dataset": manifest["source"].get("name") or manifest["source"]["path"], "split": "test",
              "users": int(len(targets)), "items": num_items, "ks": ecfg.ks,
              "infer": {k: topk_manifest.get(k) for k in ("scorer", "top_k", "num_beams", "model_version", "text")},
              "models": models}
    cold = cold_item_mask(layout, num_items)
    if cold is not None:
        report["cold_items"] = int(cold.sum())
        report["groups"] = group_metrics(lists, targets, num_items, ecfg.ks, cold)
    write_report(run_dir, report, baseline["losses"] if baseline else [], cfg.train.objective)
    return report


def _train_rows(run_dir: str) -> list[dict]:
    path = RunLayout(run_dir).train_metrics
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def write_report(run_dir: str, report: dict, sasrec_losses: list[float], objective: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = RunLayout(run_dir).report()
    with storage.staged_folder(out) as staged:
        staged.write_bytes("metrics.json", json.dumps(report, indent=2).encode())
        ks = report["ks"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, m in report["models"].items():
            axes[0].plot(ks, [m[f"HR@{k}"] for k in ks], marker="o", label=name)
            ndcg_ks = [k for k in ks if f"NDCG@{k}" in m]
            axes[1].plot(ndcg_ks, [m[f"NDCG@{k}"] for k in ndcg_ks], marker="o", label=name)
        for ax, title in zip(axes, ("HR@K", "NDCG@K")):
            ax.set_xlabel("K")
            ax.set_xticks(ks)
            ax.set_title(f"{title} — {report['dataset']} (test, full ranking)")
            ax.grid(alpha=0.3)
            ax.legend()
        staged.write_bytes("hr_ndcg_at_k.png", _png(fig))
        rows = _train_rows(run_dir)
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        valid = [(r["step"], r["valid/NDCG@10"]) for r in rows if "valid/NDCG@10" in r]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        if losses:
            axes[0].plot(*zip(*losses), marker="." if len(losses) < 50 else None)
        axes[0].set_title(f"recllm training loss ({objective or 'train.objective'} objective)")
        axes[0].set_xlabel("step")
        if valid:
            axes[1].plot(*zip(*valid), marker="o")
            best = max(valid, key=lambda sv: sv[1])
            axes[1].axvline(best[0], color="grey", linestyle="--", label=f"best round, step {best[0]}")
            axes[1].legend()
        axes[1].set_title("recllm valid NDCG@10 (training rounds)")
        axes[1].set_xlabel("step")
        if sasrec_losses:
            axes[2].plot(range(1, len(sasrec_losses) + 1), sasrec_losses, marker=".")
        axes[2].set_title("SASRec training loss")
        axes[2].set_xlabel("epoch")
        for ax in axes:
            ax.grid(alpha=0.3)
        staged.write_bytes("training_loss.png", _png(fig))
        if "groups" in report:
            staged.write_bytes("warm_cold.png", _png(_warm_cold_figure(report, plt)))
        staged.write_bytes("report.md", _markdown(report).encode())
    return out


def _warm_cold_figure(report: dict, plt):
    """HR@10 and NDCG@10 of every model on warm-target and cold-target users, side by side."""
    import numpy as np

    groups = report["groups"]
    names = list(report["models"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("HR@10", "NDCG@10")):
        for offset, (group, rows) in enumerate(groups.items()):
            values = [rows["models"].get(n, {}).get(metric, 0.0) for n in names]
            ax.bar(np.arange(len(names)) + 0.4 * offset, values, width=0.4, label=f"{group} ({rows['users']:,} users)")
        ax.set_xticks(np.arange(len(names)) + 0.2, names)
        ax.set_title(f"{metric} by target kind — {report['dataset']}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    return fig


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _scorer_words(infer: dict) -> str:
    """What made the top-K, in the scorer's own terms: beams for beam search, the text weight for the multinomial
    head with item text."""
    if infer.get("scorer") == "beam":
        return f"trie-constrained beam search ({infer.get('num_beams')} beams)"
    text = infer.get("text")
    if infer.get("scorer") == "multinomial" and text:
        return (f"the multinomial item head + text expert (weight {text['weight']:g} on the user's last "
                f"{text['history']} items, untrained-item bias {text.get('untrained_bias') or 0:g}; chosen on valid)")
    return f"the `{infer.get('scorer')}` scorer"


def _markdown(report: dict) -> str:
    ks = report["ks"]
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks if k > 1]
    extra = ["invalid_item_rate", f"Coverage@{max(ks)}"]
    lines = [f"# recllm evaluation: {report['dataset']}", "",
             f"Test split, full ranking over {report['items']:,} items, {report['users']:,} users. "
             f"Top-K from {_scorer_words(report['infer'])}, model {report['infer'].get('model_version')}.", "",
             "| model | " + " | ".join(cols + extra) + " |", "|---" * (len(cols) + len(extra) + 1) + "|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols + extra) + " |")
    if "groups" in report:
        lines += ["", f"Users by their target: {report['cold_items']:,} items were held out of training as new "
                      "(`data.cold_items`); a row averages over its own users only.", "",
                  "| users | model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for group, g in report["groups"].items():
            for name, m in g["models"].items():
                lines.append(f"| {group} ({g['users']:,}) | {name} | "
                             + " | ".join(f"{m.get(c, float('nan')):.4f}" for c in cols) + " |")
        lines += ["", "![warm and cold targets](warm_cold.png)"]
    lines += ["", "![HR@K and NDCG@K](hr_ndcg_at_k.png)", "",
              "![Training loss, valid NDCG@10 by round, SASRec loss](training_loss.png)", ""]
    return "\n".join(lines)
