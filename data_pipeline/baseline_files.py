"""run_dir/baseline/: the files `recllm train-baseline` writes (SASRec's weights as safetensors, its item
embeddings, a manifest with its valid score), and the one reader build-ids and evaluate share. The reader
refuses a baseline that does not belong to the run: missing, trained on another dataset/ than the one now in
run_dir, or (given the run's settings) trained with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import safetensors.numpy

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.run_layout import MANIFEST_FILE, RunLayout

ITEM_EMBEDDINGS_FILE = "item_embeddings.safetensors"
"""One tensor, ``item_embeddings`` [num_items, hidden]: row i is dense item_id i."""
FORMAT = "recllm.baseline/1"
RETRAIN = "run `recllm train-baseline`"


def baseline_dir(run_dir: str) -> str:
    return RunLayout(run_dir).baseline


def baseline_settings(config, seed: int) -> dict:
    """What fixes the baseline a run trains: its ``baseline:`` section (a dataclass) and the run's seed."""
    return {"seed": seed, **dataclasses.asdict(config)}


def dataset_fingerprint(run_dir: str) -> str:
    """Digest of run_dir/dataset/'s files (their sha256 in its manifest): what the baseline was trained on."""
    manifest = json.loads(storage.read_text(RunLayout(run_dir).dataset_manifest))
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def read_baseline(run_dir: str, settings: dict | None = None) -> dict:
    """The baseline's manifest, once it is known to belong to this run. ``settings`` (``baseline_settings`` of
    the run's config) must equal what it was trained with; None checks the dataset only."""
    uri = storage.join(baseline_dir(run_dir), MANIFEST_FILE)
    if not storage.exists(uri):
        raise DataError(uri, f"no baseline; {RETRAIN} first")
    manifest = json.loads(storage.read_text(uri))
    if manifest.get("format") != FORMAT:
        raise DataError(uri, f"format {manifest.get('format')!r}, expected {FORMAT!r}; {RETRAIN}")
    if manifest["dataset"] != dataset_fingerprint(run_dir):
        raise DataError(uri, f"trained on another dataset/ than the one in run_dir (prepared again since); {RETRAIN}")
    if settings is not None:
        trained = manifest["settings"]
        changed = [f"{k} {trained.get(k)!r} -> {v!r}" for k, v in sorted(settings.items()) if trained.get(k) != v]
        if changed:
            raise DataError(uri, f"trained with other settings than this run's ({', '.join(changed)}); {RETRAIN}")
    return manifest


def read_item_embeddings(run_dir: str, settings: dict | None = None) -> tuple[np.ndarray, dict]:
    """(item embeddings [num_items, hidden] float32, manifest) of the run's baseline, checked as ``read_baseline``."""
    manifest = read_baseline(run_dir, settings)
    tensors = safetensors.numpy.load(storage.read_bytes(storage.join(baseline_dir(run_dir), ITEM_EMBEDDINGS_FILE)))
    return tensors["item_embeddings"], manifest
