"""Recipe ablations on the shipped Scientific data (CPU, tiny LLaMA): ControlRec and CLLM4Rec with and without
each component, next to plain alignment SFT and SASRec. Each row is a real `recllm pipeline` run; rows that
differ only in training share the first run's dataset/, item_ids/, samples/ and SASRec (copied, not rebuilt).

    python bench/recipe_ablations.py [--only controlrec|cllm4rec|sft] [--out runs/ablations] [key=value ...]

Prints a markdown table of test HR@K / NDCG@K and writes it to <out>/ablations.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.run_layout import RunLayout  # noqa: E402

# name, config, overrides, folders copied from the recipe's first run, stages run
RUNS = [
    ("sft", "sft: semantic IDs (the demo)", "configs/alignment_sft.yaml", [], None),
    ("controlrec", "ControlRec (HFM + ICL + visibility)", "configs/controlrec_scientific.yaml", [], None),
    ("controlrec", "ControlRec without HFM", "configs/controlrec_scientific.yaml", ["train.controlrec.hfm=false"],
     "train"),
    ("controlrec", "ControlRec without ICL", "configs/controlrec_scientific.yaml", ["train.controlrec.icl=false"],
     "train"),
    ("controlrec", "ControlRec without visibility matrix", "configs/controlrec_scientific.yaml",
     ["train.controlrec.visibility=false"], "train"),
    ("controlrec", "sft: sub-token IDs (ControlRec, every component off)", "configs/controlrec_scientific.yaml",
     ["train.objective=sft"], "train"),
    ("cllm4rec", "CLLM4Rec (collab + content LMs, mutual reg., multinomial head)", "configs/cllm4rec_scientific.yaml",
     [], None),
    ("cllm4rec", "CLLM4Rec without mutual regularization", "configs/cllm4rec_scientific.yaml",
     ["train.cllm4rec.mutual_regularization=0"], "train"),
    ("cllm4rec", "CLLM4Rec with shared rows (no content twins)", "configs/cllm4rec_scientific.yaml",
     ["ids.content_tokens=false"], "build-ids"),
    ("cllm4rec", "CLLM4Rec without collab/content LMs (multinomial head only)", "configs/cllm4rec_scientific.yaml",
     ["samples.tasks=[user_sequence]"], "build-samples"),
]
STAGES = ["prepare", "train-baseline", "build-ids", "build-samples", "train", "infer", "evaluate"]
SHARED = {"train": ["dataset", "baseline", "item_ids", "samples"], "build-samples": ["dataset", "baseline", "item_ids"],
          "build-ids": ["dataset", "baseline"]}
"""The RunLayout folders a run that starts at that stage copies from the recipe's first run."""


def run(config: str, run_dir: Path, overrides: list[str], start: str | None, first: Path | None) -> float:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    stages = STAGES
    if start and first:
        src, dst = RunLayout(str(first)), RunLayout(str(run_dir))
        for folder in SHARED[start]:
            if Path(getattr(src, folder)).exists():
                shutil.copytree(getattr(src, folder), getattr(dst, folder))
        stages = STAGES[STAGES.index(start):]
    cmd = [sys.executable, "-m", "launcher.cli", "pipeline", config, f"run_dir={run_dir}",
           f"stages=[{','.join(stages)}]", *overrides]
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["sft", "controlrec", "cllm4rec"], action="append")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run (e.g. train.max_steps=100)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows, firsts = [], {}
    for n, (recipe, label, config, overrides, start) in enumerate(RUNS):
        if args.only and recipe not in args.only:
            continue
        run_dir = out / f"{n:02d}_{recipe}"
        seconds = run(config, run_dir, [*args.overrides, *overrides], start, firsts.get(recipe))
        firsts.setdefault(recipe, run_dir)
        report = json.loads((Path(RunLayout(str(run_dir)).report()) / "metrics.json").read_text())
        rows.append((label, report["models"], seconds))
        print(f"{label}: HR@10 {report['models']['recllm']['HR@10']:.4f} ({seconds:.0f} s)", flush=True)
    lines = ["| run | HR@5 | HR@10 | NDCG@10 | HR@20 | NDCG@20 | coverage@20 | wall s |", "|---|---|---|---|---|---|---|---|"]
    for label, models, seconds in rows:
        m = models["recllm"]
        lines.append(f"| {label} | {m['HR@5']:.4f} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['HR@20']:.4f} | "
                     f"{m['NDCG@20']:.4f} | {m['Coverage@20']:.3f} | {seconds:.0f} |")
    for name, label in (("popular", "most popular (same split)"), ("sasrec", "SASRec (same split)")):
        base = next((models[name] for _, models, _ in rows if name in models), None)
        if base:
            lines.append(f"| {label} | {base['HR@5']:.4f} | {base['HR@10']:.4f} | {base['NDCG@10']:.4f} | "
                         f"{base['HR@20']:.4f} | {base['NDCG@20']:.4f} | {base.get('Coverage@20', float('nan')):.3f} | |")
    table = "\n".join(lines)
    (out / "ablations.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
