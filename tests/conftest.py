"""Shared fixtures: paths to shipped and shared data, one local Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "scientific"
SHARED_DATASETS = Path(os.environ.get("RECLLM_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def scientific_slice(folder: Path, users: int) -> Path:
    """The first `users` users of the shipped Scientific data, with the items they touch, as raw LC-Rec files."""
    import json

    inter = json.loads((DEMO_DATA / "Scientific.inter.json").read_text())
    kept = dict(list(inter.items())[:users])
    touched = {str(i) for seq in kept.values() for i in seq}
    items = {k: v for k, v in json.loads((DEMO_DATA / "Scientific.item.json").read_text()).items() if k in touched}
    folder.mkdir(parents=True)
    (folder / "Scientific.inter.json").write_text(json.dumps(kept))
    (folder / "Scientific.item.json").write_text(json.dumps(items))
    return folder


def shared_dataset(folder: str) -> Path:
    path = SHARED_DATASETS / folder
    if not path.exists():
        pytest.skip(f"shared dataset {path} not present on this machine (set RECLLM_SHARED_DATASETS)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """The shipped Scientific data prepared once per session: run_dir/dataset."""
    from data_pipeline.config import DataConfig
    from data_pipeline.prepare import run_prepare

    run_dir = tmp_path_factory.mktemp("demo_run")
    run_prepare(DataConfig(format="lcrec", path=str(DEMO_DATA), name="Scientific"), str(run_dir))
    return run_dir / "dataset"
