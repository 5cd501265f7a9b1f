"""Checkpoint selection on the valid score: the trainer offers each validation round's metrics; the best
round's weights are kept in ``run_dir/train/best/`` (safetensors + the step and its valid metrics), and
training stops after ``patience`` rounds without a better score. Its state rides in every training
checkpoint, so a resumed run keeps comparing against the same best. Export reads the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainers.validation import VALID_METRIC

BEST_STATE = "best_state.json"


class BestCheckpoint:
    def __init__(self, folder: Path, patience: int, state: dict | None = None):
        self.folder, self.patience = Path(folder), patience
        state = state or {}
        self.step: int | None = state.get("step")
        self.metrics: dict[str, float] = state.get("metrics", {})
        self.bad_rounds: int = state.get("bad_rounds", 0)

    @property
    def score(self) -> float:
        return self.metrics.get(VALID_METRIC, float("-inf"))

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.bad_rounds >= self.patience

    def state(self) -> dict:
        return {"step": self.step, "metrics": self.metrics, "bad_rounds": self.bad_rounds}

    def offer(self, step: int, metrics: dict[str, float]) -> bool:
        """Record a validation round; True when it is the best so far (strictly better: ties keep the earlier)."""
        if metrics[VALID_METRIC] > self.score:
            self.step, self.metrics, self.bad_rounds = step, dict(metrics), 0
            return True
        self.bad_rounds += 1
        return False

    def save(self, weights: dict | None, rank: int, lora: bool) -> None:
        """Rank 0 writes the gathered weights next to a temporary name and renames it over the old best."""
        if rank != 0:
            return
        from trainers.deepspeed_engine import save_weights

        tmp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(weights, tmp / "weights.safetensors")
        (tmp / BEST_STATE).write_text(json.dumps({**self.state(), "lora": lora}, indent=2))
        old = self.folder.with_name(f".{self.folder.name}.old-{os.getpid()}")
        if self.folder.exists():
            self.folder.rename(old)
        tmp.rename(self.folder)
        shutil.rmtree(old, ignore_errors=True)


def read_best(folder: Path) -> dict | None:
    """The best round's state ({step, metrics, lora}) when training kept one, else None."""
    path = Path(folder) / BEST_STATE
    return json.loads(path.read_text()) if path.exists() else None
