"""The nightly job's capacity plan for a model no config names by size (issue #29): what `recllm plan` prints for
the configured model, here for LLaMA-2-7B, LLaMA-2-13B and Llama-3.1-8B's shapes, both scorers, at a catalogue and
a night you choose. Semantic IDs for beam search (ids.levels x ids.codes new tokens), one atomic token per item for
the multinomial head. Rates: inference/measured_rates.json, scaled by FLOPs where the shape differs.

    .venv/bin/python bench/capacity_plan.py --users 100000000 --items 1000000 --gpus 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.capacity_plan import plan_infer  # noqa: E402
from launcher.config import load_config  # noqa: E402
from trainers import models  # noqa: E402

SHAPES = {"llama2_7b": models.LLAMA2_7B, "llama2_13b": models.LLAMA2_13B, "llama3.1_8b": models.LLAMA31_8B}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--models", default="llama3.1_8b,llama2_7b")
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128, help="users per forward batch (the measured rows' 128)")
    a = parser.parse_args()
    for name in a.models.split(","):
        for scorer, scheme in (("beam", "semantic"), ("multinomial", "atomic")):
            cfg = load_config(None, ["stages=[infer]", f"infer.scorer={scorer}", f"ids.scheme={scheme}", f"infer.num_beams={a.beams}",
                                     f"infer.top_k={min(a.beams, 20)}", f"infer.batch_size={a.batch}",
                                     f"infer.plan_users={a.users}", f"infer.plan_gpus={a.gpus}"])
            new_tokens = cfg.ids.levels * cfg.ids.codes if scheme == "semantic" else a.items
            plan = plan_infer(cfg, name, SHAPES[name].llama_config(), a.items, new_tokens)
            print("\n".join(plan.lines()), end="\n\n")


if __name__ == "__main__":
    main()
