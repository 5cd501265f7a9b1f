"""Data stage: importers for public formats, the canonical sharded Parquet dataset, and the streaming reader."""
