"""One training run's checkpoints, written and read back in one place (issue #28): every
``train.checkpoint_every`` steps each rank writes its optimizer shard and loader position and rank 0 the state,
the weights and the tokenizer into a temporary folder that Ray Train persists (``report``); a restarted or resumed
run reads them back in two steps, weights before the DeepSpeed wrap and the rest after (``restore_weights``,
``restore_progress``). The file names are ``run_layout.CheckpointFiles``; which folder to resume from is
``resume_point``'s. The trainer (trainers/trainer.py) owns one Checkpointer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from data_pipeline.run_layout import CheckpointFiles

log = logging.getLogger("recllm.train")


class Checkpointer:
    def __init__(self, dse, rank: int, trainable_only: bool):
        """``dse``: trainers.deepspeed_engine (the trainer imports it); ``trainable_only``: LoRA checkpoints keep
        only the trainable parameters."""
        self.dse, self.rank, self.trainable_only = dse, rank, trainable_only

    def restore_weights(self, model, folder: Path) -> dict:
        """The checkpoint's trainer state, after loading its weights into the unwrapped ``model``."""
        state = json.loads((folder / CheckpointFiles.STATE).read_text())
        self.dse.load_weights(model, folder / CheckpointFiles.WEIGHTS, trainable_only=self.trainable_only)
        log.info("resuming from %s at step %d", folder, state["step"])
        return state

    def restore_progress(self, engine, scheduler, feed, folder: Path) -> None:
        """This rank's optimizer, schedule and loader position (after the wrap: the optimizer exists then)."""
        self.dse.load_optimizer(engine, scheduler, folder / CheckpointFiles.optimizer(self.rank))
        feed.load_state_dict(json.loads((folder / CheckpointFiles.loader(self.rank)).read_text()))

    def report(self, engine, scheduler, feed, tokenizer, step: int, best_state: dict, metrics: dict,
               send: Callable[[dict, Path], None]) -> None:
        """Write this step's checkpoint and ``send(metrics, folder)`` it to Ray Train while the folder exists
        (every rank calls it; ray_worker's session sends)."""
        dse, rank = self.dse, self.rank
        weights = dse.gathered_state(engine, trainable_only=self.trainable_only)  # collective under ZeRO-3
        with tempfile.TemporaryDirectory(prefix="recllm-ckpt-") as tmp:
            tmp = Path(tmp)
            dse.save_optimizer(engine, scheduler, tmp / CheckpointFiles.optimizer(rank))
            _write_json(tmp / CheckpointFiles.loader(rank), feed.state_dict())
            if rank == 0:
                dse.save_weights(weights, tmp / CheckpointFiles.WEIGHTS)
                tokenizer.save_pretrained(tmp / CheckpointFiles.TOKENIZER)
                state = {"step": step, "lora": self.trainable_only, "best": best_state}
                _write_json(tmp / CheckpointFiles.STATE, state)
            send(metrics, tmp)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
