"""Recommendation quality across datasets, recipes and seeds, next to SASRec and most-popular measured in the
same runs. Each cell is a real `recllm pipeline CONFIG` run whose config is used unchanged except for data.*
(the dataset) and seed; the report of each run holds recllm, SASRec and most-popular on the test split.

    python bench/quality.py [--datasets scientific,instruments] [--recipes demo,semantic] [--seeds 0,1,2]
                            [--out runs/quality] [key=value ...]   # extra overrides apply to every run

Runs whose report exists are read, not re-run (the bench resumes). Prints mean ± std over seeds and writes
<out>/quality.md and <out>/quality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"

DATASETS = {  # only data.* differs between datasets: the configs run unchanged
    "scientific": ["data.format=lcrec", "data.path=data/scientific", "data.name=Scientific"],
    "instruments": ["data.format=lcrec", f"data.path={SHARED / 'instruments_lcrec'}", "data.name=Instruments"],
    "beauty": ["data.format=lcrec", f"data.path={SHARED / 'beauty_p5_ids'}", "data.name=Beauty"],
    "video_games": ["data.format=sasrec", f"data.path={SHARED / 'video_games_sasrec'}", "data.name=Video"],
}
RECIPES = {  # name -> (config, overrides on top of it: only for the ablation rows, never data.*)
    "demo": ("configs/demo.yaml", []),
    "semantic": ("configs/scientific_semantic.yaml", []),
    "cllm4rec": ("configs/cllm4rec_scientific.yaml", []),
    "controlrec": ("configs/controlrec_scientific.yaml", []),
    # what the seeds' alignment tasks add on top of the sequence-level objective (items need text)
    "demo+text": ("configs/demo.yaml", ["samples.tasks=[user_sequence,text_alignment,query_alignment]"]),
    # the demo without item text vectors (text.vectors off), for the text-on / text-off comparison of issue #26
    "demo-notext": ("configs/demo.yaml", ["text.vectors=false"]),
    # new items: 10% of the catalogue held out of training, scored as warm- and cold-target users apart
    "demo+cold": ("configs/demo.yaml", ["data.cold_items=0.1"]),
    "demo-notext+cold": ("configs/demo.yaml", ["text.vectors=false", "data.cold_items=0.1"]),
    "demo+collab_lm": ("configs/demo.yaml", ["samples.tasks=[user_sequence,collaborative_lm]"]),
}
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
MODELS = ("recllm", "sasrec", "popular", "content")
GROUPS = ("warm", "cold")
"""Users by their target's kind, in runs with data.cold_items (report["groups"])."""


def run_cell(dataset: str, recipe: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{dataset}-{recipe}-s{seed}"
    report = run_dir / "report" / "metrics.json"
    if not report.exists():
        log = out / f"{dataset}-{recipe}-s{seed}.log"
        config, recipe_overrides = RECIPES[recipe]
        cmd = [str(Path(sys.executable).with_name("recllm")), "pipeline", config, f"run_dir={run_dir}",
               f"seed={seed}", *DATASETS[dataset], *recipe_overrides, *extra]
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}  (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            print(f"  failed (exit {done.returncode}); see {log}", flush=True)
            return {}
        (run_dir / "report" / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    wall = run_dir / "report" / "wall_seconds.txt"
    full = json.loads(report.read_text())
    metrics = full["models"]
    for group, rows in full.get("groups", {}).items():
        for model, values in rows["models"].items():
            metrics[f"{model} ({group} targets, {rows['users']} users)"] = values
    metrics["wall_seconds"] = float(wall.read_text()) if wall.exists() else None
    return metrics


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict) -> str:
    lines = ["| dataset | recipe | seeds | model | " + " | ".join(METRICS) + " | recllm / SASRec HR@10, NDCG@10 | "
             "wall (min) |", "|" + "---|" * (len(METRICS) + 7)]
    for (dataset, recipe), cells in results.items():
        seeds = sorted(cells)
        grouped = sorted({k for s in seeds for k in cells[s] if " targets, " in k})
        for model in [*MODELS, *grouped]:
            if not any(model in cells[s] for s in seeds):
                continue
            row = [mean_std([cells[s][model][m] for s in seeds if model in cells[s]]) for m in METRICS]
            ratio, wall = "", ""
            if model == "recllm":
                ratio = ", ".join(f"{statistics.mean(cells[s]['recllm'][m] / cells[s]['sasrec'][m] for s in seeds):.2f}x"
                                  for m in ("HR@10", "NDCG@10"))
                walls = [cells[s]["wall_seconds"] / 60 for s in seeds if cells[s].get("wall_seconds")]
                wall = f"{statistics.mean(walls):.1f}" if walls else ""
            lines.append(f"| {dataset} | {recipe} | {','.join(map(str, seeds))} | {model} | " + " | ".join(row)
                         + f" | {ratio} | {wall} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scientific", help=f"comma list of {list(DATASETS)}")
    parser.add_argument("--recipes", default="demo", help=f"comma list of {list(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for dataset in args.datasets.split(","):
        for recipe in args.recipes.split(","):
            for seed in map(int, args.seeds.split(",")):
                cell = run_cell(dataset, recipe, seed, out, args.overrides)
                if cell:
                    results.setdefault((dataset, recipe), {})[seed] = cell
                    (out / "quality.md").write_text(table(results) + "\n")
    text = table(results)
    print(text)
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps({f"{d}/{r}": c for (d, r), c in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
