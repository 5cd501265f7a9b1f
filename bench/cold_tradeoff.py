"""Warm against cold targets on valid (issue #26): how the multinomial scorer's text settings trade the users whose
target is a trained item against those whose target is an item no train sequence holds. One trained run_dir with
`data.cold_items` > 0 and item text vectors; the model scores the valid sample once, and every (neighbours,
temperature, weight, untrained bias) re-ranks it. Prints all / warm / cold NDCG@10 and HR@10 per setting.

    .venv/bin/python bench/cold_tradeoff.py RUN_DIR [--users 4000]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.run_layout import RunLayout  # noqa: E402
from launcher.config import load_config  # noqa: E402
from ranking.multinomial_head import item_logits  # noqa: E402
from ranking.ranking_metrics import ndcg_at_k  # noqa: E402
from ranking.text_expert import TextExpert  # noqa: E402
from ranking.topk_scorer import TopKScorer  # noqa: E402
from trainers.validation import valid_sample  # noqa: E402


def hit_rate(top: np.ndarray, targets: np.ndarray) -> float:
    return float((top == targets[:, None]).any(1).mean()) if len(targets) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--neighbours", default="5,20,50")
    parser.add_argument("--temperatures", default="0.02,0.05,0.1,0.3")
    parser.add_argument("--weights", default="6,8")
    parser.add_argument("--biases", default="-3,-2,-1,0,1,2")
    a = parser.parse_args()
    run = str(Path(a.run_dir).resolve())
    cfg = load_config(str(Path(run) / "config" / "config.yaml"), [f"run_dir={run}"])
    layout = RunLayout(run)
    counts = layout.read_manifest()["counts"]
    scorer = TopKScorer.from_model_dir(run, layout.model, cfg.infer.scorer_settings(text_weight=0.0,
                                       text_untrained_bias=0.0), counts["items"], counts["users"])
    if scorer.text is None:
        raise SystemExit(f"{run}: no item text vectors (text.vectors) or not the multinomial scorer")
    valid = layout.read_sequences("valid").sort_by("user_id")
    rows = valid_sample(valid.num_rows, a.users, cfg.seed)
    users = valid.column("user_id").to_numpy()[rows]
    histories = [valid.column("history").to_pylist()[r] for r in rows]
    targets = valid.column("target").to_numpy()[rows]
    cold = ~scorer.text.trained.numpy()[targets]
    raw = torch.cat([item_logits(scorer.model, *scorer._encode(users[s:s + 64], histories[s:s + 64]),
                                 scorer.item_token_ids) for s in range(0, len(users), 64)])
    similarity = scorer.text.text_scores(histories)
    print(f"{run}: {len(rows)} valid users, {int(cold.sum())} with a cold target")
    print("neighbours temperature weight bias | all NDCG@10 | warm NDCG@10 HR@10 | cold NDCG@10 HR@10")
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    for k, temperature in itertools.product(floats(a.neighbours), floats(a.temperatures)):
        expert = TextExpert(scorer.text.vectors.numpy(), scorer.text.trained.numpy(), cfg.infer.text_history, 0.0,
                            neighbours=int(k), temperature=temperature)
        base = expert.item_logits(raw)
        for row, history in enumerate(histories):
            base[row, torch.as_tensor(history)] = float("-inf")
        for weight, bias in itertools.product(floats(a.weights), floats(a.biases)):
            scores = base.clone()
            scores[:, expert.untrained_ids] += bias
            top = scorer.items[(scores + weight * similarity).topk(10, dim=-1).indices.numpy()]
            print(f"{int(k)} {temperature:g} {weight:g} {bias:g} | {ndcg_at_k(top, targets, 10):.4f} | "
                  f"{ndcg_at_k(top[~cold], targets[~cold], 10):.4f} {hit_rate(top[~cold], targets[~cold]):.4f} | "
                  f"{ndcg_at_k(top[cold], targets[cold], 10):.4f} {hit_rate(top[cold], targets[cold]):.4f}")


if __name__ == "__main__":
    main()
