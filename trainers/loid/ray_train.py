"""`recllm train-loid`: the LoID runs through Ray Train + DeepSpeed (the TorchTrainer pattern of
trainers/ray_launch.py). Each source domain trains and saves its plugin; then every target variant (target
LoRA only; lambda=0; frozen source plugins + target re-LoRA) trains from the same frozen base. Outputs per run:
run_dir/loid/<run>/{plugin/<domain>/ (peft), domain_state.safetensors, run.json, logs/ (TensorBoard)}; the
saved state is the epoch with the lowest valid MSE (rank 0 scores the valid split after every epoch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("recllm.loid")


def planned_runs(cfg) -> list[dict]:
    """Source runs first (their plugins feed loid_plugin), then the target variants, in config order."""
    c = cfg.loid
    runs = [{"name": f"source_{d}", "domain": d, "sources": [], "cl_weight": c.cl_weight} for d in c.source_domains]
    for variant in c.variants:
        runs.append({"name": variant, "domain": c.target_domain,
                     "sources": list(c.source_domains) if variant == "loid_plugin" else [],
                     "cl_weight": 0.0 if variant == "loid_no_cl" else c.cl_weight})
    return runs


def build_loid_model(cfg, run: dict, reviews, tokenizer_and_lm=None):
    """(LoIDRegressor, tokenizer) for ``run``: frozen base, frozen source plugins, a trainable domain LoRA."""
    from trainers.loid.model import LoIDRegressor
    from trainers.loid.plugins import attach_plugins, lora_config
    from trainers.models import build_model

    c = cfg.loid
    lm, tokenizer = tokenizer_and_lm or build_model(cfg.model, [], device="cpu", seed=cfg.seed)
    root = Path(cfg.run_dir).resolve() / "loid"
    sources = {d: root / f"source_{d}" / "plugin" / d for d in run["sources"]}
    missing = [str(p) for p in sources.values() if not (p / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"source plugin(s) {missing} missing: train the source domains first")
    peft_model = attach_plugins(lm, run["domain"], lora_config(c.lora_r, c.lora_alpha, c.lora_target_modules),
                                sources, merge=c.plugins == "merge")
    train_ratings = reviews.ratings[reviews.rows("train")]
    model = LoIDRegressor(peft_model, tokenizer, reviews.num_users, reviews.num_items, c.pooling, run["cl_weight"],
                          c.margin, float(train_ratings.mean()))
    return model, tokenizer


def _train_settings(c, total_steps: int):
    from trainers.train_config import TrainConfig

    return TrainConfig(micro_batch_size=c.batch_size, gradient_accumulation_steps=1, learning_rate=c.learning_rate,
                       weight_decay=c.weight_decay, warmup_steps=min(10, total_steps // 10), lr_schedule="cosine",
                       max_steps=total_steps, deepspeed_config=c.deepspeed_config, num_workers=c.num_workers)


def loid_loop_per_worker(config: dict) -> None:
    import ray.train
    from tqdm import tqdm

    from trainers import deepspeed_engine as dse

    dse.configure_cpu_accelerator()
    from data_pipeline.reviews.build_reviews import read_reviews
    from trainers.loid.batches import DomainReviews
    from trainers.loid.plugins import save_plugin
    from trainers.metrics_logger import MetricsLogger
    from trainers.models import build_model

    cfg, run, out_dir = config["cfg"], config["run"], Path(config["out_dir"])
    c = cfg.loid
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    lm, tokenizer = build_model(cfg.model, [], device="cpu", seed=cfg.seed)
    reviews = DomainReviews(read_reviews(cfg.run_dir, run["domain"]), tokenizer, c.review_tokens, cfg.reviews.k)
    model, _ = build_loid_model(cfg, run, reviews, (lm, tokenizer))
    train_rows = reviews.rows("train")
    per_epoch = len(train_rows) // (c.batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"{run['domain']}: {len(train_rows)} train reviews < batch_size x workers")
    total = per_epoch * c.epochs if not c.max_steps else min(c.max_steps, per_epoch * c.epochs)
    tset = _train_settings(c, total)
    engine, _, scheduler = dse.wrap_model(model, tset, dse.deepspeed_config(tset, config["deepspeed_config"],
                                                                            bf16=False))
    frozen_before = frozen_digest(engine.module)
    metrics_log = MetricsLogger(out_dir / "logs", enabled=rank == 0)
    progress = tqdm(total=total, desc=run["name"], unit="step") if rank == 0 else None
    rng = np.random.default_rng(cfg.seed)
    step, window, t0 = 0, {"loss": 0.0, "l_rec": 0.0, "l_cl": 0.0, "n": 0}, time.perf_counter()
    best = {"valid_mse": float("inf"), "step": 0, "state": None}
    valid_rows = reviews.rows("valid")
    engine.train()
    while step < total:
        order = rng.permutation(train_rows)  # same permutation on every rank; each takes its own stride
        for s in range(per_epoch):
            if step >= total:
                break
            lo = (s * world + rank) * c.batch_size
            out = engine(reviews.batch(order[lo: lo + c.batch_size]))
            engine.backward(out["loss"])
            engine.step()
            step += 1
            for key in ("loss", "l_rec", "l_cl"):
                window[key] += float(out[key].detach())
            window["n"] += 1
            if progress:
                progress.update(1)
            if step % c.log_every == 0 or step == total:
                metrics = {k: window[k] / window["n"] for k in ("loss", "l_rec", "l_cl")}
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics_log.log(step, metrics)
                ray.train.report({"step": step, **metrics})
                last = metrics
                window = {"loss": 0.0, "l_rec": 0.0, "l_cl": 0.0, "n": 0}
        if rank == 0 and len(valid_rows):  # end of an epoch: keep the trainable state with the best valid MSE
            valid_mse = _valid_mse(engine.module, reviews, valid_rows)
            metrics_log.log(step, {"valid_mse": valid_mse})
            if valid_mse < best["valid_mse"]:
                best = {"valid_mse": valid_mse, "step": step, "state": {
                    n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}}
            engine.train()
    if progress:
        progress.close()
    metrics_log.close()
    frozen_after = frozen_digest(engine.module)
    # ZeRO-2 keeps full parameters on every rank, so rank 0 can write the plugin from its own module.
    if rank == 0:
        from safetensors.torch import save_file

        module = engine.module
        if best["state"] is not None:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in best["state"]:
                        p.copy_(best["state"][n])
        save_plugin(module.lm, run["domain"], out_dir / "plugin")
        save_file({k: v.contiguous() for k, v in module.domain_state().items()}, str(out_dir / "domain_state.safetensors"))
        (out_dir / "run.json").write_text(json.dumps({**run, "steps": step, "loss": last["loss"],
                                                      "l_rec": last["l_rec"], "l_cl": last["l_cl"],
                                                      "seconds": round(time.perf_counter() - t0, 1),
                                                      "best_step": best["step"], "best_valid_mse": best["valid_mse"],
                                                      "frozen": {"before": frozen_before, "after": frozen_after},
                                                      "workers": world}, indent=2))


def frozen_digest(module) -> dict:
    """sha256 over every frozen parameter (base LM and source plugins), and how many there are of each."""
    import hashlib

    digest, counts = hashlib.sha256(), {"base": 0, "plugins": 0}
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        counts["plugins" if ".lora_" in name else "base"] += p.numel()
    return {"sha256": digest.hexdigest(), **counts}


@torch.no_grad()
def _valid_mse(module, reviews, rows: np.ndarray, batch_size: int = 64) -> float:
    module.eval()
    preds = [module(reviews.batch(rows[s: s + batch_size]))["pred"].clamp(1.0, 5.0)
             for s in range(0, len(rows), batch_size)]
    return float(((torch.cat(preds) - torch.as_tensor(reviews.ratings[rows])) ** 2).mean())


def _ray_env() -> dict:
    repo = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": "cpu"}
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run_one(cfg, run: dict) -> dict:
    """Train one LoID run on Ray Train + DeepSpeed; returns its run.json."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline import storage

    c = cfg.loid
    repo = Path(__file__).resolve().parents[2]
    root = Path(cfg.run_dir).resolve() / "loid"
    ds_path = Path(c.deepspeed_config) if Path(c.deepspeed_config).is_absolute() else repo / c.deepspeed_config
    from data_pipeline.ray_session import connect_ray

    connect_ray(_ray_env())
    # Written to a staging folder and renamed at the end: a failed run leaves no half plugin behind.
    with storage.staged_folder(str(root / run["name"])) as staged:
        Path(staged.tmp_path).mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            loid_loop_per_worker,
            train_loop_config={"cfg": cfg, "run": run, "out_dir": staged.tmp_path, "deepspeed_config": str(ds_path)},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=False,
                                         resources_per_worker={"CPU": c.cpus_per_worker}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name=run["name"], storage_path=str(root / "ray")))
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"loid run {run['name']} failed: {result.error}")
        info = json.loads((Path(staged.tmp_path) / "run.json").read_text())
    return {**info, "dir": str(root / run["name"])}


def run_loid(cfg) -> dict[str, dict]:
    """Every planned run in order (sources, then target variants)."""
    import dataclasses

    from data_pipeline.config_schema import ConfigError
    from data_pipeline.reviews.build_reviews import read_reviews

    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))  # workers run elsewhere
    ds_path = Path(cfg.loid.deepspeed_config)
    ds_path = ds_path if ds_path.is_absolute() else Path(__file__).resolve().parents[2] / ds_path
    try:
        stage = json.loads(ds_path.read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"loid.deepspeed_config: cannot read {ds_path}: {exc}"]) from None
    if stage == 3:  # rank 0 writes the plugin from its own replica, which ZeRO-3 would have partitioned
        raise ConfigError([f"loid.deepspeed_config: {ds_path} is ZeRO-3; LoID runs use ZeRO-0/1/2"])
    for domain in {*cfg.loid.source_domains, cfg.loid.target_domain}:
        read_reviews(cfg.run_dir, domain)  # fail here, with the file named, not inside a worker
    return {run["name"]: run_one(cfg, run) for run in planned_runs(cfg)}
