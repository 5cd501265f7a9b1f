"""The Trainer every Ray Train worker runs for `recllm train` (issue #28), as torchtitan's trainer: ``setup`` builds
the recipe's model, wraps it in DeepSpeed, resumes from the newest complete checkpoint (weights, optimizer,
schedule, loader position) and builds the recipe and its batch feed; ``train_step`` runs one optimizer step;
``validate`` scores a round (the recipe's own, or the ranking rounds) and keeps the best; ``checkpoint`` reports
metrics, and every ``train.checkpoint_every`` steps a checkpoint (its Checkpointer), to Ray; ``finish`` writes what
the run leaves beside its checkpoints. It calls the recipe's methods (trainers/recipes/recipe.py) and never asks
which recipe it runs. ray_worker.train_loop_per_worker drives it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline import library_log, storage
from data_pipeline.ray_session import quiet_ray_logs, worker_log_level
from data_pipeline.run_layout import TrainLayout
from trainers.best_checkpoint import BestCheckpoint
from trainers.checkpointer import Checkpointer

log = logging.getLogger("recllm.train")


@dataclass
class WorkerInputs:
    """What `ray_launch` hands every worker (Ray Train's ``train_loop_config``), typed."""

    cfg: Any
    """The composed RecllmConfig."""
    deepspeed_config: str
    train_dir: str
    """run_dir/train unless the recipe keeps several runs apart (LoID: loid/<run>/train)."""
    objective_cls: type
    """The registered recipe class (it travels to the workers by value when its module is not importable)."""
    recipe_inputs: dict
    """What the recipe's ``inputs(cfg)`` read on the driver (run_dir, new tokens, tasks, prompt format...)."""
    fault: dict = field(default_factory=dict)
    """RECLLM_FAULT_* from the driver's environment: tests kill a worker mid-run."""

    @classmethod
    def from_config(cls, config: dict) -> WorkerInputs:
        own = ("cfg", "deepspeed_config", "train_dir", "objective_cls", "fault")
        return cls(config["cfg"], config["deepspeed_config"], config["train_dir"], config["objective_cls"],
                   {k: v for k, v in config.items() if k not in own}, config.get("fault", {}))


class StepWindow:
    """The sums between two log lines: loss, tokens, slots, time, per-task rows and the recipe's scalars."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self.loss = self.time = 0.0
        self.tokens = self.slots = self.steps = 0
        self.tasks = np.zeros((self.num_tasks, 2))
        self.extras: dict[str, float] = {}

    def metrics(self, world: int, task_names: list[str], lr: float, epoch: int) -> dict[str, float]:
        tokens_per_s = self.tokens * world / max(self.time, 1e-9)
        out = {"loss": self.loss / self.steps, "tokens_per_s": tokens_per_s,
               "packing_efficiency": self.tokens / max(self.slots, 1), "lr": lr, "epoch": epoch}
        out.update({f"loss/{task}": self.tasks[i, 0] / self.tasks[i, 1] for i, task in enumerate(task_names)
                    if self.tasks[i, 1]})
        out.update({f"objective/{k}": v / self.steps for k, v in self.extras.items()})
        return out


class Trainer:
    """One worker's training run; the public methods are its phases, in order."""

    def __init__(self, inputs: WorkerInputs, session, dse):
        """``session``: this worker's Ray Train session (``ray_worker.RayTrainSession``: rank, world, local rank,
        the folder to resume from, ``report``); ``dse``: trainers.deepspeed_engine. Both come from ray_worker, the
        one module that speaks to Ray."""
        self.inputs, self.cfg, self.tcfg = inputs, inputs.cfg, inputs.cfg.train
        self.session, self.dse = session, dse
        self.rank, self.world = session.rank, session.world
        self.device = f"cuda:{session.local_rank}" if self.tcfg.use_gpu else "cpu"
        # What the run appends to as it goes (metrics, samples seen, digests) is written to a local folder and, when
        # run_dir is remote, copied there at each checkpoint and at the end.
        self.layout = TrainLayout(inputs.train_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from trainers.metrics_logger import MetricsLogger

        dse, tcfg, rank = self.dse, self.tcfg, self.rank
        dse.configure_cpu_accelerator()
        # Rank 0 narrates this project's steps; DeepSpeed's and the other libraries' INFO lines stay out.
        logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
        logging.getLogger("recllm").setLevel(worker_log_level(rank))
        quiet_ray_logs()
        torch.manual_seed(self.cfg.seed)
        if tcfg.use_gpu:
            torch.cuda.set_device(self.device)
        ds_config = dse.deepspeed_config(tcfg, self.inputs.deepspeed_config, bf16=tcfg.use_gpu)
        built = self.inputs.objective_cls.build_model(self.cfg, {**self.inputs.recipe_inputs, "ds_config": ds_config})
        self.tokenizer, self.lora = built.tokenizer, built.trainable_only
        self.checkpointer = Checkpointer(dse, rank, self.lora)
        with self.session.resumed_folder(self.inputs.train_dir) as folder:
            state = self.checkpointer.restore_weights(built.model, folder) if folder else {"step": 0}
            self.engine, _, self.scheduler = dse.wrap_model(built.model, dse.OptimizerSettings.of(tcfg), ds_config)
            if built.host_memory is not None:
                self._write(self.layout.local_memory(rank), {**built.host_memory, "after_wrap": dse.host_rss()})
            self.recipe = self._build_recipe(built)
            self.feed = self.recipe.batches(self.cfg, self.inputs.recipe_inputs, self.tokenizer, rank, self.world)
            if folder:
                self.checkpointer.restore_progress(self.engine, self.scheduler, self.feed, folder)
        self.step = state["step"]
        self.metrics_log = MetricsLogger(self.layout.local_logs, enabled=rank == 0)
        self.rounds = None
        if tcfg.eval_every and not self.recipe.validates_itself:  # LoID scores its own rounds (valid MSE per epoch)
            from trainers.validation import ValidationRound

            self.rounds = ValidationRound(self.cfg.infer.scorer_settings(), tcfg.eval_users, self.cfg.seed,
                                          self.inputs.recipe_inputs["run_dir"], self.tokenizer,
                                          self.inputs.recipe_inputs["prompt_format"], rank, self.world, self.device)
        self.best = BestCheckpoint(self.layout.best, tcfg.patience, state.get("best"), *self.recipe.selection)
        self.seen_log = None
        if tcfg.record_samples:
            self.layout.local_samples_seen(rank).parent.mkdir(parents=True, exist_ok=True)
            self.seen_log = open(self.layout.local_samples_seen(rank), "a")
        self.window = StepWindow(len(self.inputs.recipe_inputs["tasks"]))
        self.flops_per_token, self.peak = 6.0 * sum(p.numel() for p in self.engine.module.parameters()), _peak(tcfg)
        self.progress = _progress_bar(tcfg.max_steps, self.step) if rank == 0 else None
        self.engine.train()

    def _build_recipe(self, built):
        from trainers.recipes.contract import ObjectiveContext

        model, recipe_inputs = built.model, self.inputs.recipe_inputs
        return self.inputs.objective_cls.build(ObjectiveContext(
            self.tcfg, recipe_inputs["tasks"], self.tokenizer, recipe_inputs["new_tokens"], recipe_inputs["run_dir"],
            self.cfg.seed, self.rank, getattr(getattr(model, "config", None), "_attn_implementation", "sdpa"),
            root=self.cfg, world=self.world, data=built.data))

    # ------------------------------------------------------------------ the loop's phases
    @property
    def done(self) -> bool:
        return self.step >= self.tcfg.max_steps or self.best.stopped

    def inject_fault(self) -> None:
        """Tests kill a worker mid-run: RECLLM_FAULT_AT_STEP=N (set where `recllm train` runs) kills rank 1 once,
        before step N+1; the file RECLLM_FAULT_MARKER remembers it happened."""
        at, marker = self.inputs.fault.get("RECLLM_FAULT_AT_STEP"), self.inputs.fault.get("RECLLM_FAULT_MARKER")
        if at and marker and self.step == int(at) and self.rank == 1 and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank {self.rank} at step {self.step}\n")
            log.warning("fault injection: killing rank %d at step %d", self.rank, self.step)
            os._exit(1)

    def train_step(self) -> None:
        """One optimizer step over ``train.gradient_accumulation_steps`` micro-batches."""
        t0, window, accumulate = time.perf_counter(), self.window, self.tcfg.gradient_accumulation_steps
        step_ids: list[int] = []
        for _ in range(accumulate):
            batch = self.feed.next_batch()
            loss, per_task, extras = self.recipe.loss(self.engine, batch, self.step, self.device)
            for key, value in extras.items():
                window.extras[key] = window.extras.get(key, 0.0) + value / accumulate
            self.engine.backward(loss)
            self.engine.step()
            window.loss += loss.item() / accumulate
            window.tokens += batch.real_tokens
            window.slots += batch.slots
            window.tasks += per_task
            step_ids += batch.sample_ids
        self.step += 1
        window.time += time.perf_counter() - t0
        window.steps += 1
        if self.seen_log:
            self.seen_log.write(json.dumps({"step": self.step, "sample_ids": step_ids}) + "\n")
            self.seen_log.flush()
        if self.progress:
            self.progress.update(1)

    def validate(self) -> dict[str, float]:
        """This step's valid metrics ({} when it is no round); the best round's weights are kept."""
        final, dse = self.step == self.tcfg.max_steps, self.dse
        metrics: dict[str, float] = {}
        if self.recipe.validates_itself:
            with dse.full_parameters(self.engine):
                metrics = self.recipe.validate(self.engine, self.step, self.feed, final)
        elif self.rounds and (self.step % self.tcfg.eval_every == 0 or final):
            with dse.full_parameters(self.engine):
                metrics = self.rounds.score(self.engine)
        if metrics:
            if self.best.offer(self.step, metrics):  # every rank has the same all-reduced score: same decision
                self.best.save(dse.gathered_state(self.engine, trainable_only=self.lora), self.rank, self.lora)
            if self.rank == 0:
                self._narrate(metrics)
        return metrics

    def _narrate(self, metrics: dict[str, float]) -> None:
        line = f"{_fmt(metrics)} (best {_fmt(self.best.metrics)} at step {self.best.step})"
        if self.progress is not None and not library_log.verbose():
            # on the bar, not a console line per round; every round is in TensorBoard and metrics.jsonl
            self.progress.set_postfix_str(f"valid {line}", refresh=False)
            log.debug("step %d: %s", self.step, line)
        else:
            log.info("step %d: %s", self.step, line)

    def checkpoint(self, valid_metrics: dict[str, float]) -> None:
        """Log and report this step when it is a log or checkpoint step; at a checkpoint step, with a checkpoint."""
        tcfg, step = self.tcfg, self.step
        is_last = self.done
        is_log = step % tcfg.log_every == 0 or is_last or bool(valid_metrics)
        is_ckpt = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or is_last
        if not (is_log or is_ckpt):
            return
        metrics = {"step": step, **self.window.metrics(self.world, self.inputs.recipe_inputs["tasks"],
                                                       self.scheduler.get_last_lr()[0], self.feed.epoch),
                   **valid_metrics}
        if self.peak:
            metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / (self.peak * self.world)
        self.metrics_log.log(step, {k: v for k, v in metrics.items() if k != "step"})
        self.window.reset()
        if not is_ckpt:
            self.session.report(metrics)
            return
        self.checkpointer.report(self.engine, self.scheduler, self.feed, self.tokenizer, step, self.best.state(),
                                 metrics, self.session.report)
        self.layout.publish(self.rank)

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """What the run leaves beside its checkpoints: the recipe's record, the parameter digest, the logs."""
        if self.progress:
            self.progress.close()
        finished = self.recipe.finish(self.engine.module)  # LoID: its frozen parts' digests
        if finished is not None:
            self._write(self.layout.local_objective(self.rank), finished)
        digest = self.dse.param_digest(self.engine)  # collective under ZeRO-3
        self.layout.local_param_digest(self.rank).parent.mkdir(parents=True, exist_ok=True)
        self.layout.local_param_digest(self.rank).write_text(digest)
        self.metrics_log.close()
        if self.seen_log:
            self.seen_log.close()
        self.layout.publish(self.rank)

    @staticmethod
    def _write(path: Path, value) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _peak(tcfg) -> float:
    if tcfg.peak_tflops:
        return tcfg.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return 0.0
    from trainers.flop_count import peak_bf16_flops

    return peak_bf16_flops(torch.cuda.get_device_name())


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    # Ray forwards every redraw of a worker's bar as a console line of its own (552 lines in make demo at tqdm's
    # 0.1 s default): redraw at most every 15 s.
    return tqdm(total=total, initial=initial, desc="train", unit="step", mininterval=15)


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
