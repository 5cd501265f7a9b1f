"""One small metrics interface for every stage that trains: TensorBoard scalars + a JSONL file.

Only rank 0 writes; other ranks get a logger that drops records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        if enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir))
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_metrics(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
