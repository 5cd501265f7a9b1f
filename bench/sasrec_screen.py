"""SASRec at public strength (issue #25): train the baseline's SASRec with a few settings on a prepared run_dir
and print, for each, the best valid NDCG@10 (the selection metric), its epoch, the epochs run, the wall time and,
for the record only, test HR@10 / NDCG@10 of the valid-selected weights. Settings are chosen on valid; test is
printed so the issue's public-number comparison can be read off the same runs.

    recllm prepare configs/demo.yaml run_dir=runs/beauty data.path=../shared/datasets/beauty_p5_ids data.name=Beauty
    python bench/sasrec_screen.py runs/beauty --variant "num_blocks=1 patience=20" --variant "" --seed 0

Each --variant is a space-separated list of baseline.* keys (SASRecConfig fields) on top of the config's
``baseline:`` section (configs/demo.yaml by default). One JSON line per variant goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.run_layout import RunLayout  # noqa: E402
from launcher.config import load_config  # noqa: E402
from trainers.baseline import evaluate_sasrec, train_sasrec  # noqa: E402


def parse_variant(text: str) -> list[str]:
    return [f"baseline.{kv}" for kv in text.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run_dir where `recllm prepare` has run")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--variant", action="append", default=[], help='e.g. "num_blocks=1 patience=20"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append the JSON lines here too")
    args = parser.parse_args()
    for variant in args.variant or [""]:
        cfg = load_config(args.config, [f"run_dir={args.run_dir}", *parse_variant(variant)])
        dataset = RunLayout(args.run_dir).dataset
        start = time.perf_counter()
        result = train_sasrec(dataset, cfg.baseline, seed=args.seed)
        test = evaluate_sasrec(result.model, dataset, "test", cfg.baseline.eval_exclude_seen)
        row = {"run_dir": args.run_dir, "variant": variant, "seed": args.seed,
               "settings": dataclasses.asdict(cfg.baseline), "best_epoch": result.best_epoch,
               "epochs_run": len(result.losses), "seconds": round(time.perf_counter() - start, 1),
               "valid": {k: round(v, 5) for k, v in result.valid_metrics.items()},
               "test": {k: round(v, 5) for k, v in test.items()},
               "valid_curve": [(h["epoch"], round(h["NDCG@10"], 5)) for h in result.history]}
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
