"""Where a training run keeps its Ray checkpoints and where it resumes. ``ray_storage`` gives Ray Train the run's
storage (a local folder, or a remote URI through the project's fsspec filesystem). ``latest_checkpoint`` finds the
newest complete checkpoint folder there (`train_dir/ray/<name>/checkpoint_*`): `ray_launch` asks it for
`train.resume=true`; `ray_worker`'s session asks it after a worker failure, because Ray Train registers a
checkpoint only once its controller has polled every worker's report: a worker that dies between its upload and
that poll leaves a complete checkpoint on storage that Ray's restart does not hand back (it restarted from step 0
under load in CI). No Ray import: the Ray calls are ray_worker's and ray_launch's."""

from __future__ import annotations

import json

from data_pipeline import storage
from data_pipeline.run_layout import CheckpointFiles


def _complete(fs, folder: str, world: int | None) -> bool:
    """Rank 0 wrote the state and the weights; every rank wrote its loader position and optimizer shard."""
    if world is None:
        return True
    needed = [CheckpointFiles.WEIGHTS] + [rel for rank in range(world) for rel in CheckpointFiles.of_rank(rank)]
    return all(fs.exists(f"{folder}/{rel}") for rel in needed)


def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train: a local folder as it is; a remote URI through the same
    fsspec filesystem the other stages use (so its endpoint and credentials apply to checkpoints too)."""
    if not storage.is_remote(uri):
        return uri, None
    import pyarrow.fs

    fs, path = storage.filesystem(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def latest_checkpoint(storage_uri: str, world: int | None = None) -> tuple[str, int] | None:
    """(folder URI, step) of the newest checkpoint under ``storage_uri``, or None. With ``world``, only a
    checkpoint every one of the ``world`` ranks finished writing counts."""
    fs, path = storage.filesystem(storage_uri)
    states = fs.glob(f"{path.rstrip('/')}/*/checkpoint_*/{CheckpointFiles.STATE}")
    found = []
    for state in states:
        folder = state.rsplit("/", 1)[0]
        if _complete(fs, folder, world):
            found.append((json.loads(fs.cat_file(state))["step"], folder))
    if not found:
        return None
    step, folder = max(found)
    proto = storage_uri.split("://", 1)[0] + "://" if storage.is_remote(storage_uri) else ""
    return (proto + folder if proto and not folder.startswith(proto) else folder), step
