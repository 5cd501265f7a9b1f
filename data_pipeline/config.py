"""Config of the data stage (raw data -> canonical Parquet): where the raw data is, its format, the split."""

from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.config_schema import choice, positive

FORMATS = ("lcrec", "sasrec", "amazon_reviews", "minionerec", "parquet")
SPLITS = ("leave_last_out", "global_time")


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

    def check(self) -> list[str]:
        problems = choice("format", self.format, FORMATS) + choice("split", self.split, SPLITS)
        if not 0 < self.valid_time_quantile < self.test_time_quantile < 1:
            problems.append(f"valid_time_quantile/test_time_quantile: {self.valid_time_quantile}, "
                            f"{self.test_time_quantile}; expected 0 < valid < test < 1")
        if self.rating_min >= self.rating_max:
            problems.append(f"rating_min: {self.rating_min} must be below rating_max {self.rating_max}")
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
