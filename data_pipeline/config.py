"""Config of the data stage (raw data -> canonical Parquet): where the raw data is, its format, the split."""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.config_schema import choice, positive

FORMATS = ("lcrec", "sasrec", "amazon_reviews", "minionerec", "parquet")
SPLITS = ("leave_last_out", "global_time")
ITEM_TEXT_FIELDS = ("title", "description", "brand", "categories")
"""The item text a catalogue may carry, in items.parquet's column order."""


@dataclass
class DataConfig:
    format: str = "lcrec"
    """Raw format: lcrec | sasrec | amazon_reviews (CSV or JSON lines) | minionerec | parquet (canonical)."""
    path: str = ""
    """Folder holding the raw files, local or s3://bucket/prefix."""
    name: str = ""
    """Dataset name: the file stem for lcrec (<name>.inter.json) and minionerec; a label elsewhere."""
    split: str = "leave_last_out"
    """leave_last_out (last item = test, second-to-last = valid) or global_time (cut at time quantiles)."""
    valid_time_quantile: float = 0.8
    """global_time only: interactions at or after this quantile of time start the validation period."""
    test_time_quantile: float = 0.9
    """global_time only: interactions at or after this quantile of time start the test period."""
    min_user_interactions: int = 1
    """Users with fewer interactions are dropped (the count is logged)."""
    min_item_interactions: int = 1
    """Items with fewer interactions are dropped from interactions before user filtering (1 keeps all)."""
    rating_min: float = 1.0
    """Smallest valid rating; a rating outside [rating_min, rating_max] is an error naming its row."""
    rating_max: float = 5.0
    """Largest valid rating."""
    num_shards: int = 4
    """Parquet shards per table, assigned by a stable hash of user_id."""
    row_group_size: int = 8192
    """Rows per Parquet row group: the unit the streaming reader schedules."""
    max_history: int = 50
    """Longest history kept in sequence rows (most recent items)."""
    cold_items: float = 0.0
    """Fraction of the catalogue held out as new items (leave_last_out): a seeded draw whose interactions enter no
    train sequence and no history, kept only as valid/test targets, so the report can score items no model saw."""
    cold_items_seed: int = 0
    """Seed of the cold-item draw: the same seed holds out the same items."""

    def check(self) -> list[str]:
        problems = choice("format", self.format, FORMATS) + choice("split", self.split, SPLITS)
        if not 0 < self.valid_time_quantile < self.test_time_quantile < 1:
            problems.append(f"valid_time_quantile/test_time_quantile: {self.valid_time_quantile}, "
                            f"{self.test_time_quantile}; expected 0 < valid < test < 1")
        if self.rating_min >= self.rating_max:
            problems.append(f"rating_min: {self.rating_min} must be below rating_max {self.rating_max}")
        if not 0 <= self.cold_items < 1:
            problems.append(f"cold_items: {self.cold_items!r}; expected a fraction in [0, 1)")
        elif self.cold_items and self.split != "leave_last_out":
            problems.append(f"cold_items: {self.cold_items!r} needs split leave_last_out, not {self.split!r}")
        elif self.cold_items and self.format == "minionerec":
            problems.append("cold_items: format minionerec ships its own split rows; cold items cannot be held out")
        for name in ("min_user_interactions", "min_item_interactions", "num_shards", "row_group_size",
                     "max_history"):
            problems += positive(name, getattr(self, name))
        return problems

    def source_problems(self) -> list[str]:
        """What `recllm prepare` needs and the other stages do not read: a config without prepare (the review
        flows, which name their domains under ``reviews:``) may leave ``data:`` out."""
        problems = []
        if not self.path:
            problems.append("data.path: empty; give the folder with the raw data (local or s3://)")
        if self.format in ("lcrec", "minionerec") and not self.name:
            problems.append(f"data.name: empty; format {self.format} needs the file stem (e.g. Scientific)")
        return problems
