"""The composed recllm config: one section per stage, each owned by its stage package."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import DataConfig
from launcher.config_schema import load


@dataclass
class RecllmConfig:
    run_dir: str = "runs/default"
    """Folder (local or s3://) where every stage writes its output: dataset/, item_ids/, model/, topk/, report/."""
    seed: int = 0
    """Seed for everything random: splits of work, initialisation, sampling."""
    stages: list[str] = field(default_factory=lambda: ["prepare"])
    """Stages `recllm pipeline` runs, in order."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw data and the split (stage: prepare)."""

    def check(self) -> list[str]:
        from launcher.stages import STAGES

        unknown = [s for s in self.stages if s not in STAGES]
        return [f"stages: {unknown} not among {list(STAGES)}"] if unknown else []


def load_config(path: str | None, overrides: list[str] | None = None) -> RecllmConfig:
    return load(RecllmConfig, path, overrides)
