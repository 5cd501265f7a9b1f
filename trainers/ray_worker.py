"""Ray Train's entry point on every worker for `recllm train`, and the one module of the worker side that speaks to
Ray: a RayTrainSession (this worker's place in the group, the checkpoint to resume from, the reports) drives one
Trainer (trainers/trainer.py) through its phases. The recipe (trainers/recipes/recipe.py) builds the model, the
batch feed and the loss; the loop never asks which recipe it runs. Libraries' bare prints in it (DeepSpeed's
"built successfully" per communication backend) go to run_dir/logs/libraries.log; recllm narrates through logging
and its bar.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import ray.train

from data_pipeline import library_log
from data_pipeline.run_layout import TrainLayout
from trainers.resume_point import latest_checkpoint, ray_storage
from trainers.trainer import Trainer, WorkerInputs

log = logging.getLogger("recllm.train")


class RayTrainSession:
    """What the Trainer needs of Ray Train on this worker."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        """Metrics to Ray Train, with the checkpoint folder it persists when one is given."""
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def resumed_folder(self, train_dir: str):
        """A local copy of the checkpoint to start from, or None: the newest one every rank finished on this run's
        storage. Ray's own (``get_checkpoint``) can be older: it registers a checkpoint only after polling every
        worker's report, and a worker that dies before that poll loses it (trainers/resume_point.py)."""
        checkpoint = ray.train.get_checkpoint()
        found = latest_checkpoint(TrainLayout(train_dir).ray, self.world)
        if found is not None:
            folder, step = found
            if (checkpoint is None or Path(checkpoint.path).name != Path(folder).name) and self.rank == 0:
                log.warning("resuming from the step-%d checkpoint on storage (%s), which Ray had not registered "
                            "when the worker failed", step, folder)
            path, fs = ray_storage(folder)
            checkpoint = ray.train.Checkpoint(path, filesystem=fs)
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as local:
            yield Path(local)


def train_loop_per_worker(config: dict) -> None:
    from trainers import deepspeed_engine as dse

    with library_log.prints_to_log():
        trainer = Trainer(WorkerInputs.from_config(config), RayTrainSession(), dse)
        trainer.setup()
        while not trainer.done:
            trainer.inject_fault()
            trainer.train_step()
            trainer.checkpoint(trainer.validate())
        trainer.finish()
