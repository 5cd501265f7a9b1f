"""`recllm build-review-samples`: ControlRec's review tasks as SFT samples for the shared trainer. From one
domain's reviews (build-reviews) it writes run_dir/item_ids/tokens.json (atomic <user_N>/<item_N> tokens) and
run_dir/samples/{train,test}/ (prompt/response Parquet, sample_id = task code << 40 | index) + manifest.json,
so `recllm train` runs unchanged; `recllm evaluate-reviews` decodes samples/test.
"""

from __future__ import annotations

import json
import string
import time
from importlib import resources

import numpy as np
import pyarrow as pa

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.item_ids.atomic_ids import item_token, user_token
from data_pipeline.reviews.build_reviews import read_reviews
from data_pipeline.reviews.task_config import ReviewTasksConfig
from data_pipeline.run_layout import MANIFEST_FILE, STATS_FILE, TOKENS_FILE, RunLayout

TEMPLATE_FILE = "review_tasks.json"
# Codes above the shared sample stage's (1-4, and its valid code) so sample_ids never collide.
REVIEW_TASK_CODES = {"rating": 11, "explanation": 12, "review_summary": 13, "direct_recommendation": 14}
ID_BITS = 40
SLOTS = {"rating": ({"user", "item", "history", "item_said"}, {"rating"}),
         "explanation": ({"user", "item", "rating"}, {"review"}),
         "review_summary": ({"review"}, {"summary"}),
         "direct_recommendation": ({"user", "history", "candidates"}, {"item"})}
SCHEMA = pa.schema([("sample_id", pa.int64()), ("task", pa.string()), ("prompt", pa.string()),
                    ("response", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()),
                    ("review_id", pa.int64()), ("template", pa.int32())])


def _slots(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def load_templates(text: str | None = None, where: str = TEMPLATE_FILE) -> dict[str, list[tuple[str, str]]]:
    """task -> [(prompt, response)], each template's slots checked against what its task fills."""
    text = text if text is not None else (resources.files("data_pipeline.samples.templates") / TEMPLATE_FILE).read_text()
    try:
        variants = json.loads(text)["variants"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(where, f"expected {{\"variants\": {{task: [...]}}}}: {exc}") from None
    out = {}
    for task, (prompt_slots, response_slots) in SLOTS.items():
        templates = variants.get(task)
        if not templates:
            raise DataError(where, "no templates", field=task)
        for i, tpl in enumerate(templates):
            if _slots(tpl.get("prompt", "")) != prompt_slots or _slots(tpl.get("response", "")) != response_slots:
                raise DataError(where, f"slots {sorted(_slots(tpl.get('prompt', '')))} -> "
                                       f"{sorted(_slots(tpl.get('response', '')))}; expected {sorted(prompt_slots)} "
                                       f"-> {sorted(response_slots)}", row=f"{task}[{i}]")
        out[task] = [(t["prompt"], t["response"]) for t in templates]
    return out


def cut_words(text: str | None, n: int) -> str:
    words = (text or "").split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def rating_text(rating: float) -> str:
    return str(int(round(rating)))


def build_task_rows(reviews: pa.Table, cfg: ReviewTasksConfig, split: str, seed: int,
                    templates: dict[str, list[tuple[str, str]]], template_index: int | None = None) -> pa.Table:
    """Samples of every task in ``cfg.tasks`` for the reviews of ``split``; a random paraphrase per sample
    unless ``template_index`` fixes one (evaluation)."""
    cols = reviews.to_pydict()
    n_items = max(cols["item_id"]) + 1
    by_id = {rid: n for n, rid in enumerate(cols["review_id"])}
    reviewed = {}
    for u, i in zip(cols["user_id"], cols["item_id"]):
        reviewed.setdefault(u, set()).add(i)
    rows = {name: [] for name in SCHEMA.names}
    for task in cfg.tasks:
        rng = np.random.default_rng([seed, REVIEW_TASK_CODES[task], len(split)])
        index = 0
        for n, rid in enumerate(cols["review_id"]):
            if cols["split"][n] != split:
                continue
            user, item = cols["user_id"][n], cols["item_id"][n]
            if task == "review_summary" and not cols["summary"][n]:
                continue
            history = [item_token(cols["item_id"][by_id[h]]) for h in cols["user_history"][n][: cfg.history_items]]
            item_hist = cols["item_history"][n]
            slots = {"user": user_token(user), "item": item_token(item), "rating": rating_text(cols["rating"][n]),
                     "history": ", ".join(history) or "nothing yet",
                     "item_said": (cols["summary"][by_id[item_hist[0]]] or "no summary") if item_hist else "no reviews yet",
                     "review": cut_words(cols["text"][n], cfg.review_words), "summary": cols["summary"][n] or ""}
            if task == "direct_recommendation":
                pool = [i for i in range(n_items) if i not in reviewed[user]]
                decoys = rng.choice(pool, size=min(cfg.candidates - 1, len(pool)), replace=False).tolist()
                cands = [item, *decoys]
                rng.shuffle(cands)
                slots["candidates"] = ", ".join(item_token(c) for c in cands)
            choices = templates[task]
            t = template_index if template_index is not None else int(rng.integers(len(choices)))
            prompt, response = choices[t]
            rows["sample_id"].append((REVIEW_TASK_CODES[task] << ID_BITS) + index)
            rows["task"].append(task)
            rows["prompt"].append(prompt.format(**slots))
            rows["response"].append(response.format(**slots))
            rows["user_id"].append(user)
            rows["item_id"].append(item)
            rows["review_id"].append(rid)
            rows["template"].append(t)
            index += 1
    return pa.table(rows, schema=SCHEMA)


def run_build_review_samples(cfg, run_dir: str | None = None) -> dict:
    """Write item_ids/tokens.json and samples/ for the shared trainer; returns the samples manifest."""
    c: ReviewTasksConfig = cfg.review_tasks
    run_dir = run_dir or cfg.run_dir
    t0 = time.perf_counter()
    reviews = read_reviews(run_dir, c.domain)
    templates = load_templates()
    train = build_task_rows(reviews, c, "train", cfg.seed, templates)
    test = build_task_rows(reviews, c, "test", cfg.seed, templates, template_index=0)
    users, items = reviews.column("user_id").to_numpy(), reviews.column("item_id").to_numpy()
    tokens = [item_token(i) for i in range(int(items.max()) + 1)] + [user_token(u) for u in range(int(users.max()) + 1)]
    layout = RunLayout(run_dir)
    with storage.staged_folder(layout.item_ids) as staged:
        staged.write_bytes(TOKENS_FILE, json.dumps(tokens).encode())
        staged.write_bytes(STATS_FILE, json.dumps({"scheme": "atomic", "items": int(items.max()) + 1,
                                                      "new_tokens": len(tokens), "source": f"reviews/{c.domain}"}).encode())
    shuffled = train.take(pa.array(np.random.default_rng(cfg.seed).permutation(train.num_rows)))
    with storage.staged_folder(layout.samples) as staged:
        for split, table in (("train", shuffled), ("test", test)):
            for k in range(c.num_shards):
                part = table.take(pa.array(np.arange(k, table.num_rows, c.num_shards)))
                staged.write_parquet(f"{split}/part-{k:05d}.parquet", part, 512)
        counts = {s: {t: int(np.sum(np.asarray(tb.column("task").to_pylist()) == t)) for t in c.tasks}
                  for s, tb in (("train", train), ("test", test))}
        manifest = {"domain": c.domain, "config": {"tasks": list(c.tasks), **{k: v for k, v in vars(c).items()
                                                                             if k != "tasks"}},
                    "counts": counts, "seed": cfg.seed, "codes": {t: REVIEW_TASK_CODES[t] for t in c.tasks},
                    "templates": {t: len(templates[t]) for t in c.tasks}, "seconds": round(time.perf_counter() - t0, 2),
                    "files": dict(sorted(staged.files.items()))}
        staged.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return manifest
