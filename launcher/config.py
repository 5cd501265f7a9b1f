"""The composed recllm config: one section per stage, each owned by its stage package."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import DataConfig
from data_pipeline.config_schema import load, positive
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.reviews.config import ReviewsConfig
from data_pipeline.reviews.task_config import ReviewTasksConfig
from data_pipeline.samples.config import SamplesConfig
from trainers.model_config import ModelConfig
from trainers.train_config import TrainConfig
from trainers.loid.config import LoIDConfig
from inference.config import EvalConfig, InferConfig


@dataclass
class RecllmConfig:
    run_dir: str = "runs/default"
    """Folder (local or s3://) where every stage writes its output: dataset/, item_ids/, model/, topk/, report/."""
    seed: int = 0
    """Seed for everything random: splits of work, initialisation, sampling."""
    stages: list[str] = field(default_factory=lambda: ["prepare"])
    """Stages `recllm pipeline` runs, in order."""
    lock_max_age_hours: float = 24.0
    """--break-lock breaks a run_dir/.lock this old even when its process may still run (on another host)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw data and the split (stage: prepare)."""
    ids: IdsConfig = field(default_factory=IdsConfig)
    """How the LM names items: atomic, subtoken, semantic or precomputed IDs (stage: build-ids)."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """Training samples: tasks, negatives per positive, prompt templates (stage: build-samples)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LLaMA-family model, its size, weights and how the new item/user token rows start."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Distributed SFT: Ray Train workers, DeepSpeed ZeRO, LoRA or full, packing, checkpoints (stage: train)."""
    infer: InferConfig = field(default_factory=InferConfig)
    """Top-K for every user: beam search or multinomial head, Ray actor pool, resumable cache (stage: infer)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Metrics and report next to a SASRec baseline (stage: evaluate)."""
    reviews: ReviewsConfig = field(default_factory=ReviewsConfig)
    """Review domains, their split and k-review histories (stage: build-reviews)."""
    loid: LoIDConfig = field(default_factory=LoIDConfig)
    """LoID: source plugins, target re-LoRA, ID-content triplet loss (stages: train-loid, evaluate-loid)."""
    review_tasks: ReviewTasksConfig = field(default_factory=ReviewTasksConfig)
    """ControlRec's review tasks as SFT samples (stages: build-review-samples, train, evaluate-reviews)."""

    def check(self) -> list[str]:
        from launcher.stages import STAGES

        from trainers.recipes.registry import OBJECTIVES, objective_class

        unknown = [s for s in self.stages if s not in STAGES]
        problems = [f"stages: {unknown} not among {list(STAGES)}"] if unknown else []
        objective_class("sft")  # loads the shipped recipes into the registry
        if self.train.objective in OBJECTIVES:  # an unknown name is reported by train.check
            problems += OBJECTIVES[self.train.objective].check(self)
        if self.infer.scorer == "multinomial" and self.ids.scheme != "atomic":
            problems.append(f"infer.scorer: 'multinomial' scores one token per item (ids.scheme=atomic), got "
                            f"ids.scheme={self.ids.scheme!r}")
        return problems + positive("lock_max_age_hours", self.lock_max_age_hours)


def load_config(path: str | None, overrides: list[str] | None = None) -> RecllmConfig:
    return load(RecllmConfig, path, overrides)
