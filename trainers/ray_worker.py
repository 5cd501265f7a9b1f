"""The loop each Ray Train worker runs for `recllm train`: build the model with the new tokens, wrap it in
DeepSpeed, stream this worker's samples (tokenised inside Ray Data), pack them, train, report metrics and
checkpoints to Ray, and resume exactly (weights, optimizer, schedule, loader position) after a failure.
The recipe (trainers/recipes/recipe.py) builds the model, the batch feed and the loss, and a recipe that is not a
packed LM loss (LoID) overrides them; the loop calls its methods and never asks which recipe it runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import library_log, storage
from data_pipeline.ray_session import quiet_ray_logs, worker_log_level
from trainers.best_checkpoint import BestCheckpoint

log = logging.getLogger("recllm.train")


def _fault_injection(step: int, rank: int, fault: dict) -> None:
    """Tests kill a worker mid-run: RECLLM_FAULT_AT_STEP=N (set where `recllm train` runs) kills rank 1 once,
    before step N+1; the file RECLLM_FAULT_MARKER remembers it happened."""
    at, marker = fault.get("RECLLM_FAULT_AT_STEP"), fault.get("RECLLM_FAULT_MARKER")
    if at and marker and step == int(at) and rank == 1 and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} at step {step}\n")
        log.warning("fault injection: killing rank %d at step %d", rank, step)
        os._exit(1)


def _resume_checkpoint(train_dir: str, world: int, rank: int):
    """The checkpoint to start from: the newest one every rank finished on this run's storage. Ray's own
    (``get_checkpoint``) can be older: it registers a checkpoint only after polling every worker's report, and a
    worker that dies before that poll loses it (see resume_point)."""
    import ray.train

    from trainers.resume_point import latest_checkpoint, ray_storage

    registered = ray.train.get_checkpoint()
    found = latest_checkpoint(storage.join(train_dir, "ray"), world)
    if found is None:
        return registered
    folder, step = found
    if registered is None or Path(registered.path).name != Path(folder).name:
        if rank == 0:
            log.warning("resuming from the step-%d checkpoint on storage (%s), which Ray had not registered "
                        "when the worker failed", step, folder)
    path, fs = ray_storage(folder)
    return ray.train.Checkpoint(path, filesystem=fs)


def _flops_per_token(model) -> float:
    n = sum(p.numel() for p in model.parameters())
    return 6.0 * n


def _peak_flops(cfg) -> float:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return 0.0
    from trainers.flop_count import peak_bf16_flops

    return peak_bf16_flops(torch.cuda.get_device_name())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker. Libraries' bare prints in it (DeepSpeed's "built successfully"
    per communication backend) go to run_dir/logs/libraries.log; recllm narrates through logging and its bar."""
    with library_log.prints_to_log():
        _train_loop(config)


def _train_loop(config: dict) -> None:
    import ray.train

    from trainers import deepspeed_engine as dse

    dse.configure_cpu_accelerator()
    from trainers.metrics_logger import MetricsLogger
    from trainers.recipes.contract import ObjectiveContext

    cfg = config["cfg"]
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Rank 0 narrates this project's steps; DeepSpeed's and the other libraries' INFO lines stay out.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    logging.getLogger("recllm").setLevel(worker_log_level(rank))
    quiet_ray_logs()
    torch.manual_seed(cfg.seed)
    device = f"cuda:{ctx.get_local_rank()}" if tcfg.use_gpu else "cpu"
    if tcfg.use_gpu:
        torch.cuda.set_device(device)
    run_dir = config["run_dir"]  # a local path or a remote URI: inputs are read through data_pipeline.storage
    train_dir = config["train_dir"]  # run_dir/train unless the recipe keeps several runs apart
    # What the loop appends to as it goes (metrics, samples seen, digests) is written to a local folder and,
    # when run_dir is remote, copied there at each checkpoint and at the end.
    local_train = _local_train_dir(train_dir)
    new_tokens = config["new_tokens"]
    objective_cls = config["objective_cls"]

    ds_config = dse.deepspeed_config(tcfg, config["deepspeed_config"], bf16=tcfg.use_gpu)
    built = objective_cls.build_model(cfg, {**config, "ds_config": ds_config})
    model, tokenizer, lora = built.model, built.tokenizer, built.trainable_only

    checkpoint = _resume_checkpoint(train_dir, world, rank)
    trainer_state: dict = {"step": 0}
    ckpt_dir_ctx = checkpoint.as_directory() if checkpoint else None
    ckpt_dir = Path(ckpt_dir_ctx.__enter__()) if ckpt_dir_ctx else None
    if ckpt_dir:
        trainer_state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        dse.load_weights(model, ckpt_dir / "model" / "weights.safetensors", trainable_only=lora)
        log.info("resuming from %s at step %d", ckpt_dir, trainer_state["step"])

    engine, optimizer, scheduler = dse.wrap_model(model, dse.OptimizerSettings.of(tcfg), ds_config)
    if built.host_memory is not None:
        (local_train / "memory").mkdir(parents=True, exist_ok=True)
        (local_train / "memory" / f"rank-{rank}.json").write_text(
            json.dumps({**built.host_memory, "after_wrap": dse.host_rss()}))

    tasks = config["tasks"]
    objective = objective_cls.build(ObjectiveContext(
        tcfg, tasks, tokenizer, new_tokens, run_dir, cfg.seed, rank,
        getattr(getattr(model, "config", None), "_attn_implementation", "sdpa"), root=cfg, world=world,
        data=built.data))
    feed = objective.batches(cfg, config, tokenizer, rank, world)
    if ckpt_dir:
        dse.load_optimizer(engine, scheduler, ckpt_dir / "optimizer" / f"rank-{rank}")
        feed.load_state_dict(json.loads((ckpt_dir / "loader" / f"rank-{rank}.json").read_text()))
        ckpt_dir_ctx.__exit__(None, None, None)

    metrics_log = MetricsLogger(local_train / "logs", enabled=rank == 0)
    validation = None
    if tcfg.eval_every and not objective.validates_itself:  # LoID scores its own rounds (valid MSE per epoch)
        from trainers.validation import ValidationRound

        validation = ValidationRound(cfg, run_dir, tokenizer, config["prompt_format"], rank, world, device)
    best = BestCheckpoint(storage.join(train_dir, "best"), tcfg.patience, trainer_state.get("best"),
                          *objective.selection)
    seen_log = None
    if tcfg.record_samples:
        (local_train / "samples_seen").mkdir(parents=True, exist_ok=True)
        seen_log = open(local_train / "samples_seen" / f"rank-{rank}.jsonl", "a")
    flops_token, peak = _flops_per_token(engine.module), _peak_flops(tcfg)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        # Ray forwards every redraw of a worker's bar as a console line of its own (552 lines in make demo at
        # tqdm's 0.1 s default): redraw at most every 15 s.
        progress = tqdm(total=tcfg.max_steps, initial=trainer_state["step"], desc="train", unit="step",
                        mininterval=15)

    window = {"loss": 0.0, "tokens": 0, "slots": 0, "time": 0.0, "steps": 0}
    task_window = np.zeros((len(tasks), 2))
    extras_window: dict[str, float] = {}
    step = trainer_state["step"]
    engine.train()
    while step < tcfg.max_steps and not best.stopped:
        _fault_injection(step, rank, config.get("fault", {}))
        t0 = time.perf_counter()
        step_ids: list[int] = []
        for _ in range(tcfg.gradient_accumulation_steps):
            batch = feed.next_batch()
            loss, per_task, extras = objective.loss(engine, batch, step, device)
            for key, value in extras.items():
                extras_window[key] = extras_window.get(key, 0.0) + value / tcfg.gradient_accumulation_steps
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item() / tcfg.gradient_accumulation_steps
            window["tokens"] += batch.real_tokens
            window["slots"] += batch.slots
            task_window += per_task
            step_ids += batch.sample_ids
        step += 1
        window["time"] += time.perf_counter() - t0
        window["steps"] += 1
        if seen_log:
            seen_log.write(json.dumps({"step": step, "sample_ids": step_ids}) + "\n")
            seen_log.flush()
        if progress:
            progress.update(1)
        valid_metrics = {}
        if objective.validates_itself:
            with dse.full_parameters(engine):
                valid_metrics = objective.validate(engine, step, feed, step == tcfg.max_steps)
        elif validation and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
            with dse.full_parameters(engine):
                valid_metrics = validation.score(engine)
        if valid_metrics:
            if best.offer(step, valid_metrics):  # every rank has the same all-reduced score: same decision
                best.save(dse.gathered_state(engine, trainable_only=lora), rank, lora)
            if rank == 0:
                round_line = f"{_fmt(valid_metrics)} (best {_fmt(best.metrics)} at step {best.step})"
                if progress is not None and not library_log.verbose():
                    # on the bar, not a console line per round; every round is in TensorBoard and metrics.jsonl
                    progress.set_postfix_str(f"valid {round_line}", refresh=False)
                    log.debug("step %d: %s", step, round_line)
                else:
                    log.info("step %d: %s", step, round_line)
        is_last = step == tcfg.max_steps or best.stopped
        is_log = step % tcfg.log_every == 0 or is_last or bool(valid_metrics)
        is_ckpt = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or is_last
        if not (is_log or is_ckpt):
            continue
        tokens_per_s = window["tokens"] * world / max(window["time"], 1e-9)
        metrics = {"step": step, "loss": window["loss"] / window["steps"], "tokens_per_s": tokens_per_s,
                   "packing_efficiency": window["tokens"] / max(window["slots"], 1),
                   "lr": scheduler.get_last_lr()[0], "epoch": feed.epoch}
        for i, task in enumerate(tasks):
            if task_window[i, 1]:
                metrics[f"loss/{task}"] = task_window[i, 0] / task_window[i, 1]
        metrics.update({f"objective/{k}": v / window["steps"] for k, v in extras_window.items()})
        metrics.update(valid_metrics)
        extras_window.clear()
        if peak:
            metrics["mfu"] = tokens_per_s * flops_token / (peak * world)
        metrics_log.log(step, {k: v for k, v in metrics.items() if k != "step"})
        window = {k: 0.0 if k != "steps" else 0 for k in window}
        task_window[:] = 0
        if is_ckpt:
            _report_with_checkpoint(engine, scheduler, feed, step, rank, lora, tokenizer, metrics, dse, best)
            _publish(local_train, train_dir, rank)
        else:
            ray.train.report(metrics)
    if progress:
        progress.close()
    finished = objective.finish(engine.module)  # what a recipe records about the trained model (LoID: frozen parts)
    if finished is not None:
        (local_train / "objective").mkdir(parents=True, exist_ok=True)
        (local_train / "objective" / f"rank-{rank}.json").write_text(json.dumps(finished))
    digest = dse.param_digest(engine)  # collective under ZeRO-3
    (local_train / "param_digest").mkdir(parents=True, exist_ok=True)
    (local_train / "param_digest" / f"rank-{rank}.txt").write_text(digest)
    metrics_log.close()
    if seen_log:
        seen_log.close()
    _publish(local_train, train_dir, rank)


def _local_train_dir(train_dir: str) -> Path:
    if not storage.is_remote(train_dir):
        return Path(train_dir)
    import hashlib

    return Path(tempfile.gettempdir()) / f"recllm-train-{hashlib.sha256(train_dir.encode()).hexdigest()[:12]}"


def _publish(local_train: Path, train_dir: str, rank: int) -> None:
    """Copy this rank's appended files to a remote train_dir (local runs write in place)."""
    if not storage.is_remote(train_dir):
        return
    mine = [f"samples_seen/rank-{rank}.jsonl", f"param_digest/rank-{rank}.txt", f"objective/rank-{rank}.json",
            f"memory/rank-{rank}.json"]
    if rank == 0:
        mine += [p.relative_to(local_train).as_posix() for p in (local_train / "logs").rglob("*") if p.is_file()]
    fs, root = storage.filesystem(train_dir)
    for rel in mine:
        if (local_train / rel).is_file():
            fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
            fs.put_file(str(local_train / rel), f"{root}/{rel}")


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _report_with_checkpoint(engine, scheduler, feed, step, rank, lora, tokenizer, metrics, dse, best) -> None:
    import ray.train

    weights = dse.gathered_state(engine, trainable_only=lora)  # collective under ZeRO-3: every rank calls it
    with tempfile.TemporaryDirectory(prefix="recllm-ckpt-") as tmp:
        tmp = Path(tmp)
        dse.save_optimizer(engine, scheduler, tmp / "optimizer" / f"rank-{rank}")
        (tmp / "loader").mkdir()
        (tmp / "loader" / f"rank-{rank}.json").write_text(json.dumps(feed.state_dict()))
        if rank == 0:
            dse.save_weights(weights, tmp / "model" / "weights.safetensors")
            tokenizer.save_pretrained(tmp / "model" / "tokenizer")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "lora": lora, "best": best.state()}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
