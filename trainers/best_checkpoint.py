"""Checkpoint selection on the valid score: the trainer offers each validation round's metrics; the best
round's weights are kept in ``run_dir/train/best/`` (safetensors + the step and its valid metrics), and
training stops after ``patience`` rounds without a better score. Its state rides in every training
checkpoint, so a resumed run keeps comparing against the same best. Export reads the folder.
"""

from __future__ import annotations

import json

from data_pipeline import storage
from data_pipeline.run_layout import CheckpointFiles
from trainers.validation import VALID_METRIC

BEST_STATE = "best_state.json"


class BestCheckpoint:
    def __init__(self, folder: str, patience: int, state: dict | None = None, metric: str = VALID_METRIC,
                 higher_is_better: bool = True):
        """``metric``/``higher_is_better``: what selects the round (a recipe's ``selection``; LoID: valid_mse, lower)."""
        self.folder, self.patience = str(folder), patience
        self.metric, self.sign = metric, 1.0 if higher_is_better else -1.0
        state = state or {}
        self.step: int | None = state.get("step")
        self.metrics: dict[str, float] = state.get("metrics", {})
        self.bad_rounds: int = state.get("bad_rounds", 0)

    @property
    def score(self) -> float:
        return self.sign * self.metrics[self.metric] if self.metric in self.metrics else float("-inf")

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.bad_rounds >= self.patience

    def state(self) -> dict:
        return {"step": self.step, "metrics": self.metrics, "bad_rounds": self.bad_rounds}

    def offer(self, step: int, metrics: dict[str, float]) -> bool:
        """Record a validation round; True when it is the best so far (strictly better: ties keep the earlier)."""
        if self.sign * metrics[self.metric] > self.score:
            self.step, self.metrics, self.bad_rounds = step, dict(metrics), 0
            return True
        self.bad_rounds += 1
        return False

    def save(self, weights: dict | None, rank: int, lora: bool) -> None:
        """Rank 0 writes the gathered weights to a staged folder that replaces the old best when complete."""
        if rank != 0:
            return
        from trainers.deepspeed_engine import weights_bytes

        with storage.staged_folder(self.folder) as staged:
            staged.write_bytes(CheckpointFiles.BEST_WEIGHTS, weights_bytes(weights))
            staged.write_bytes(BEST_STATE, json.dumps({**self.state(), "lora": lora}, indent=2).encode())


def read_best(folder: str) -> dict | None:
    """The best round's state ({step, metrics, lora}) when training kept one, else None."""
    uri = storage.join(str(folder), BEST_STATE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
