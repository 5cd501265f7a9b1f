"""Config of the last two stages: `recllm infer` (top-K for every user) and `recllm evaluate` (metrics + report)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from data_pipeline.config import ITEM_TEXT_FIELDS
from data_pipeline.config_schema import choice, positive
from ranking.scorer_settings import ScorerSettings

MODES = ("test", "nightly")
SCORERS = ("beam", "multinomial")


@dataclass
class InferConfig:
    mode: str = "test"
    """test: users' test-split histories (for evaluation); nightly: every user's full history, for serving."""
    since: int | None = None
    """nightly only: score only users with an interaction at or after this unix time (needs timestamps)."""
    scorer: str = "beam"
    """beam: trie-constrained beam search over item codes; multinomial: one softmax over item tokens (atomic IDs)."""
    top_k: int = 20
    """Items written per user."""
    num_beams: int = 20
    """Beams per user (>= top_k)."""
    batch_size: int = 32
    """Users per forward batch inside a replica."""
    users_per_shard: int = 2048
    """Users per output file (the unit of resumption)."""
    num_replicas: int = 2
    """Model replicas in the Ray actor pool (one GPU each with use_gpu)."""
    cpus_per_replica: float = 0.5
    """CPUs Ray reserves per replica."""
    use_gpu: bool = False
    """One GPU per replica, bf16."""
    exclude_seen: bool = False
    """Never recommend an item already in the user's history."""
    max_history: int = 20
    """Most recent items put in the prompt (as in training)."""
    text_weight: float | None = None
    """multinomial with item text vectors (text.vectors): weight of the text expert, the cosine of each item's text
    vector with the user's recent items'. Empty: the one of text_weights with the best NDCG@10 on the valid users
    (train.eval_users of them, seeded) is chosen before scoring."""
    text_weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])
    """The text-expert weights tried on valid users when text_weight is empty."""
    text_history: int = 3
    """The text expert's query: the mean text vector of the user's last this-many history items."""
    text_untrained_bias: float | None = None
    """Added to the logit of every item no train sequence holds (scored from its text neighbours). Empty: chosen
    with text_weight on the valid users, from text_untrained_biases."""
    text_untrained_biases: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0])
    """The untrained-item biases tried on valid users when text_untrained_bias is empty."""
    model_dir: str = ""
    """Model folder (HF from_pretrained); empty: run_dir/model."""
    plan_users: int = 100_000_000
    """`recllm plan`'s capacity plan: the users of the night it sizes."""
    plan_gpus: int = 8
    """`recllm plan`'s capacity plan: the GPUs the night runs on."""
    plan_items: int = 0
    """`recllm plan`'s capacity plan: the catalogue it sizes; 0: the prepared dataset's (or the new tokens')."""

    def scorer_settings(self, **changes) -> ScorerSettings:
        """What the top-K scorer reads of this section (an unset text weight or bias scores as 0), with ``changes``."""
        settings = ScorerSettings(self.scorer, self.top_k, self.num_beams, self.batch_size, self.exclude_seen,
                                  self.max_history, self.text_history, self.text_weight or 0.0,
                                  self.text_untrained_bias or 0.0)
        return dataclasses.replace(settings, **changes)

    def check(self) -> list[str]:
        problems = choice("mode", self.mode, MODES) + choice("scorer", self.scorer, SCORERS)
        for name in ("top_k", "num_beams", "batch_size", "users_per_shard", "num_replicas", "cpus_per_replica",
                     "max_history", "text_history"):
            problems += positive(name, getattr(self, name))
        problems += positive("plan_users", self.plan_users) + positive("plan_gpus", self.plan_gpus)
        problems += positive("plan_items", self.plan_items, allow_zero=True)
        if self.text_weight is not None and self.text_weight < 0:
            problems.append(f"text_weight: {self.text_weight}; expected >= 0 (or empty: chosen on valid)")
        if not self.text_weights or any(w < 0 for w in self.text_weights):
            problems.append(f"text_weights: {self.text_weights}; expected a non-empty list of weights >= 0")
        if self.scorer == "beam" and self.num_beams < self.top_k:
            problems.append(f"num_beams: {self.num_beams} < top_k {self.top_k}; beam search returns at most "
                            f"num_beams items")
        if self.since is not None and self.mode != "nightly":
            problems.append("since: only with mode=nightly")
        return problems


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    """Cut-offs for HR@K and NDCG@K."""
    baseline: bool = True
    """Score the run's SASRec baseline (run_dir/baseline/, from `recllm train-baseline`) on the same split."""
    content_baseline: bool = True
    """Score the TF-IDF content baseline too (item text vs the user's recent history) when the dataset has text."""
    content_fields: list[str] = field(default_factory=lambda: ["title", "brand", "categories"])
    """Item text fields the content baseline reads (chosen on Scientific's valid split)."""
    content_history: int = 3
    """The content baseline's query: the mean TF-IDF vector of the user's last this-many history items."""

    def check(self) -> list[str]:
        problems = [] if self.ks and all(k > 0 for k in self.ks) else [f"ks: {self.ks}; expected positive cut-offs"]
        unknown = [f for f in self.content_fields if f not in ITEM_TEXT_FIELDS]
        if unknown or not self.content_fields:
            problems.append(f"content_fields: {self.content_fields}; expected a non-empty list of {list(ITEM_TEXT_FIELDS)}")
        if self.content_history < 1:
            problems.append(f"content_history: {self.content_history}; expected a positive count")
        return problems
