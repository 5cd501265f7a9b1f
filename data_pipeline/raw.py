"""What every importer returns: interactions with source IDs, an optional item catalogue, optional given splits.

Importers only parse and check their format; ``canonical`` turns this into dense IDs and splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from data_pipeline.config import ITEM_TEXT_FIELDS  # noqa: F401  (re-exported: the importers read it here)


@dataclass
class RawDataset:
    interactions: pd.DataFrame
    """Columns: user (str), item (str), position (int, order within the user), timestamp (Int64, nullable),
    rating (float, nullable), review (str, nullable), summary (str, nullable)."""
    items: pd.DataFrame | None = None
    """Catalogue: item (str) plus ITEM_TEXT_FIELDS (nullable). None when the format has no catalogue."""
    given_splits: dict[str, pd.DataFrame] | None = None
    """Formats that ship their own split rows: split -> DataFrame(user, history list[str], target str)."""
    source_files: list[str] = field(default_factory=list)
    """Files read, for the manifest."""

    @property
    def has_timestamps(self) -> bool:
        ts = self.interactions.get("timestamp")
        return ts is not None and bool(ts.notna().all()) and len(ts) > 0


def interactions_frame(users, items, positions, timestamps=None, ratings=None, reviews=None, summaries=None):
    n = len(users)
    return pd.DataFrame({
        "user": pd.Series(users, dtype="string"),
        "item": pd.Series(items, dtype="string"),
        "position": pd.Series(positions, dtype="int64"),
        "timestamp": pd.Series(timestamps if timestamps is not None else [None] * n, dtype="Int64"),
        "rating": pd.Series(ratings if ratings is not None else [None] * n, dtype="float64"),
        "review": pd.Series(reviews if reviews is not None else [None] * n, dtype="string"),
        "summary": pd.Series(summaries if summaries is not None else [None] * n, dtype="string"),
    })
