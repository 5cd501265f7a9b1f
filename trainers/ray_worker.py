"""Ray Train's entry point on every worker for `recllm train`: one Trainer (trainers/trainer.py) through its phases.
The recipe (trainers/recipes/recipe.py) builds the model, the batch feed and the loss; the loop never asks which
recipe it runs. Libraries' bare prints in it (DeepSpeed's "built successfully" per communication backend) go to
run_dir/logs/libraries.log; recllm narrates through logging and its bar.
"""

from __future__ import annotations

from data_pipeline import library_log
from trainers.trainer import Trainer, WorkerInputs


def train_loop_per_worker(config: dict) -> None:
    with library_log.prints_to_log():
        trainer = Trainer(WorkerInputs.from_config(config))
        trainer.setup()
        while not trainer.done:
            trainer.inject_fault()
            trainer.train_step()
            trainer.checkpoint(trainer.validate())
        trainer.finish()
