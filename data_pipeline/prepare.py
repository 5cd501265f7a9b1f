"""Stage 1 of the flow: raw data -> run_dir/dataset/ (canonical sharded Parquet + manifest.json).

Written to a temporary folder and renamed when complete, so a failed run leaves no dataset/.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import storage
from data_pipeline.canonical import CanonicalDataset, build_canonical
from data_pipeline.config import DataConfig
from data_pipeline.importers import import_raw
from data_pipeline.run_layout import (INTERACTIONS_DIR, ITEMS_FILE, MANIFEST_FILE, SEQUENCES_DIR, USERS_FILE,
                                      RunLayout)
from data_pipeline.sharding import user_shard

log = logging.getLogger("recllm.data")

SCHEMA_VERSION = 1


def _write_sharded(staged: storage.StagedFolder, rel_dir: str, table: pa.Table, cfg: DataConfig) -> None:
    shard = user_shard(table.column("user_id").to_numpy(), cfg.num_shards)
    for k in range(cfg.num_shards):
        part = table.filter(pa.array(shard == k))
        staged.write_parquet(f"{rel_dir}/part-{k:05d}.parquet", part, cfg.row_group_size)


def write_dataset(data: CanonicalDataset, out_uri: str, cfg: DataConfig, source_files: list[str]) -> dict:
    with storage.staged_folder(out_uri) as staged:
        staged.write_parquet(ITEMS_FILE, data.items, cfg.row_group_size)
        staged.write_parquet(USERS_FILE, data.users, cfg.row_group_size)
        _write_sharded(staged, INTERACTIONS_DIR, data.interactions, cfg)
        for split, table in data.sequences.items():
            _write_sharded(staged, f"{SEQUENCES_DIR}/{split}", table, cfg)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"format": cfg.format, "path": cfg.path, "name": cfg.name, "files": source_files},
            "split": cfg.split if cfg.format != "minionerec" else "given",
            "counts": data.counts,
            "has_text": bool(pc.any(pc.is_valid(data.items.column("title"))).as_py()) if data.items.num_rows else False,
            "has_timestamps": bool(data.interactions.column("timestamp").null_count == 0),
            "has_ratings": bool(data.interactions.column("rating").null_count == 0),
            "num_shards": cfg.num_shards,
            "files": dict(sorted(staged.files.items())),
        }
        staged.write_bytes(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return manifest


def run_prepare(cfg: DataConfig, run_dir: str) -> dict:
    """Import, canonicalise and write; returns the manifest."""
    raw = import_raw(cfg)
    data = build_canonical(raw, cfg)
    out = RunLayout(run_dir).dataset
    manifest = write_dataset(data, out, cfg, raw.source_files)
    log.info("wrote %s: %d users, %d items, %d interactions", out, data.counts["users"], data.counts["items"],
             data.counts["interactions"])
    return manifest
