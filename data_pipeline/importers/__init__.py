"""Importers from public recommendation formats (and our canonical Parquet) into a RawDataset."""

from __future__ import annotations

from data_pipeline.config import DataConfig
from data_pipeline.raw import RawDataset


def import_raw(cfg: DataConfig) -> RawDataset:
    from data_pipeline.importers import amazon_reviews, lcrec, minionerec, parquet_logs, sasrec

    readers = {
        "lcrec": lcrec.read,
        "sasrec": sasrec.read,
        "amazon_reviews": amazon_reviews.read,
        "minionerec": minionerec.read,
        "parquet": parquet_logs.read,
    }
    return readers[cfg.format](cfg)
