"""The composed recllm config: one section per stage, each owned by its stage package."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import DataConfig
from data_pipeline.config_schema import from_mapping, load, positive
from data_pipeline.item_ids.config import IdsConfig
from data_pipeline.item_ids.text_config import TextConfig
from data_pipeline.reviews.config import ReviewsConfig
from data_pipeline.reviews.task_config import ReviewTasksConfig
from data_pipeline.samples.config import SamplesConfig
from trainers.model_config import ModelConfig
from trainers.sasrec_config import SASRecConfig
from trainers.train_config import TrainConfig
from trainers.loid.config import LoIDConfig
from inference.config import EvalConfig, InferConfig


@dataclass
class RecllmConfig:
    run_dir: str = "runs/default"
    """Folder (local or s3://) every stage writes into: dataset/, baseline/, item_ids/, model/, topk/, report/."""
    seed: int = 0
    """Seed for everything random: splits of work, initialisation, sampling."""
    stages: list[str] = field(default_factory=lambda: ["prepare"])
    """Stages `recllm pipeline` runs, in order."""
    lock_max_age_hours: float = 24.0
    """--break-lock breaks a run_dir/.lock this old even when its process may still run (on another host)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw data and the split (stage: prepare; a config whose stages do not list prepare may leave it out)."""
    baseline: SASRecConfig = field(default_factory=SASRecConfig)
    """The run's one SASRec: semantic IDs code its item embeddings, evaluate ranks with it (stage: train-baseline)."""
    ids: IdsConfig = field(default_factory=IdsConfig)
    """How the LM names items: atomic, subtoken, semantic or precomputed IDs (stage: build-ids)."""
    text: TextConfig = field(default_factory=TextConfig)
    """Item text read by a pretrained LM into one vector per item (stage: build-ids; used by infer's scorer)."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """Training samples: tasks, negatives per positive, prompt templates (stage: build-samples)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LLaMA-family model, its size, weights and how the new item/user token rows start."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Distributed SFT: Ray Train workers, DeepSpeed ZeRO, LoRA or full, packing, checkpoints (stage: train)."""
    infer: InferConfig = field(default_factory=InferConfig)
    """Top-K for every user: beam search or multinomial head, Ray actor pool, resumable cache (stage: infer)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Metrics and report next to the SASRec baseline and most-popular (stage: evaluate)."""
    reviews: ReviewsConfig = field(default_factory=ReviewsConfig)
    """Review domains, their split and k-review histories (stage: build-reviews)."""
    loid: LoIDConfig = field(default_factory=LoIDConfig)
    """LoID: source plugins, target re-LoRA, ID-content triplet loss (stages: train-loid, evaluate-loid)."""
    review_tasks: ReviewTasksConfig = field(default_factory=ReviewTasksConfig)
    """ControlRec's review tasks as SFT samples (stages: build-review-samples, train, evaluate-reviews)."""

    def check(self) -> list[str]:
        from launcher.stages import STAGES

        unknown = [s for s in self.stages if s not in STAGES]
        problems = [f"stages: {unknown} not among {list(STAGES)}"] if unknown else []
        if "prepare" in self.stages:
            problems += self.data.source_problems()
        if self.infer.scorer == "multinomial" and self.ids.scheme != "atomic":
            problems.append(f"infer.scorer: 'multinomial' scores one token per item (ids.scheme=atomic), got "
                            f"ids.scheme={self.ids.scheme!r}")
        return problems + self._baseline_order() + positive("lock_max_age_hours", self.lock_max_age_hours)

    def baseline_readers(self) -> dict[str, str]:
        """The listed stages that read run_dir/baseline/, each with the setting that makes it read it."""
        reads = {"build-ids": ("ids.scheme=semantic" if self.ids.scheme == "semantic" else
                               "ids.subtoken_numbers=collaborative" if self.ids.scheme == "subtoken"
                               and self.ids.subtoken_numbers == "collaborative" else ""),
                 "train": ("model.new_token_init=collab" if self.model.new_token_init == "collab"
                           and self.ids.scheme != "semantic" else ""),  # semantic: the codebook in item_ids/
                 "evaluate": "eval.baseline=true" if self.eval.baseline else ""}
        return {s: reads[s] for s in self.stages if reads.get(s)}

    def _baseline_order(self) -> list[str]:
        """A pipeline runs what it lists, in order, and nothing else: a stage that reads the baseline must not come
        before train-baseline, nor after a prepare that leaves it behind (trained on the previous dataset/)."""
        where = {s: i for i, s in reversed(list(enumerate(self.stages)))}
        trained, prepared = where.get("train-baseline"), where.get("prepare")
        problems = []
        if trained is not None and prepared is not None and trained < prepared:
            problems.append("stages: train-baseline before prepare trains on the previous dataset/; list it after")
        for reader, why in self.baseline_readers().items():
            if trained is not None and where[reader] < trained:
                problems.append(f"stages: {reader} ({why}) reads run_dir/baseline/ before train-baseline writes it; "
                                f"list train-baseline first")
            elif trained is None and prepared is not None and prepared < where[reader]:
                problems.append(f"stages: {reader} ({why}) reads run_dir/baseline/ after prepare writes a new "
                                f"dataset/; list train-baseline between them")
        return problems


def recipe_problems(cfg: RecllmConfig) -> list[str]:
    """The named recipe's rules across sections (``check(root)`` of its registered class). It imports that recipe's
    module (torch), so it is skipped while the config has a structural problem: a typo answers without it."""
    from trainers.recipes.registry import objective_class, registered_objectives

    if cfg.train.objective not in registered_objectives():  # reported by train.check
        return []
    return objective_class(cfg.train.objective).check(cfg)


def load_config(path: str | None, overrides: list[str] | None = None) -> RecllmConfig:
    return load(RecllmConfig, path, overrides, deep_check=recipe_problems)


def config_from_mapping(data: dict, source: str) -> RecllmConfig:
    return from_mapping(RecllmConfig, data, source, deep_check=recipe_problems)
