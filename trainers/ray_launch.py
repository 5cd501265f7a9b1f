"""`recllm train`: the one module that speaks to Ray Train. Builds the TorchTrainer (workers, CPU or GPU,
gloo or NCCL, failure and checkpoint policy), runs `ray_worker.train_loop_per_worker`, and exports the
final checkpoint to `run_dir/model/`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from data_pipeline.ray_session import connect_ray
from data_pipeline.samples.prompt_format import PromptFormat

log = logging.getLogger("recllm.train")


def training_inputs(cfg) -> dict:
    """What every worker needs besides the config: new tokens, their texts, the task list."""
    run_dir = Path(cfg.run_dir).resolve()
    tokens_file = run_dir / "item_ids" / "tokens.json"
    if not tokens_file.exists():
        raise FileNotFoundError(f"{tokens_file}: run `recllm build-ids` first")
    new_tokens = json.loads(tokens_file.read_text())
    manifest_file = run_dir / "samples" / "manifest.json"
    if not manifest_file.exists():
        raise FileNotFoundError(f"{manifest_file}: run `recllm build-samples` first")
    manifest = json.loads(manifest_file.read_text())
    tasks = list(manifest["config"]["tasks"])
    sequence = "user_sequence" in tasks
    prompt_format = PromptFormat(
        style="sequence" if sequence else "instruction",
        max_history=manifest["config"].get("max_sequence_items", 50) if sequence
        else manifest["config"]["max_history_in_prompt"])
    token_texts = None
    if cfg.model.new_token_init == "text":
        import pyarrow.parquet as pq

        items = pq.read_table(run_dir / "dataset" / "items.parquet", columns=["item_id", "title"]).to_pylist()
        codes = pq.read_table(run_dir / "item_ids" / "item_codes.parquet", columns=["item_id", "tokens"]).to_pylist()
        titles = {r["item_id"]: r["title"] for r in items if r["title"]}
        token_texts = {row["tokens"][0]: titles[row["item_id"]] for row in codes
                       if len(row["tokens"]) == 1 and row["item_id"] in titles}
    return {"run_dir": str(run_dir), "new_tokens": new_tokens, "tasks": tasks, "token_texts": token_texts,
            "prompt_format": prompt_format}


def latest_checkpoint(storage_dir: Path):
    """The newest complete checkpoint folder under Ray's storage for this run, or None."""
    found = sorted((p for p in storage_dir.glob("*/checkpoint_*") if (p / "trainer_state.json").exists()),
                   key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"])
    return found[-1] if found else None


def run_training(cfg) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.export_model import export_checkpoint
    from trainers.recipes.registry import objective_class
    from trainers.ray_worker import train_loop_per_worker

    t = cfg.train
    inputs = training_inputs(cfg)
    run_dir = Path(inputs["run_dir"])
    repo = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    if not t.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    connect_ray(env)
    storage_dir = run_dir / "train" / "ray"
    if not t.resume:  # a fresh run must not export an earlier run's best round
        import shutil

        shutil.rmtree(run_dir / "train" / "best", ignore_errors=True)
    resume_from = None
    if t.resume:
        path = latest_checkpoint(storage_dir)
        if path is None:
            raise FileNotFoundError(f"train.resume=true but no checkpoint under {storage_dir}")
        resume_from = ray.train.Checkpoint.from_directory(str(path))
        log.info("resuming from %s", path)
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    deepspeed_config = str((repo / t.deepspeed_config) if not Path(t.deepspeed_config).is_absolute()
                           else Path(t.deepspeed_config))
    if not Path(deepspeed_config).exists():
        deepspeed_config = str(Path(t.deepspeed_config).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The class itself travels to the workers, so an objective registered outside the project (a user's
        # module, a test) trains without an edit here.
        train_loop_config={"cfg": cfg, "deepspeed_config": deepspeed_config, **inputs,
                           "objective_cls": objective_class(t.objective),
                           "fault": {k: v for k, v in os.environ.items() if k.startswith("RECLLM_FAULT_")}},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(name="sft", storage_path=str(storage_dir),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        resume_from_checkpoint=resume_from,
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        out = export_checkpoint(cfg, ckpt, inputs["new_tokens"], inputs["token_texts"],
                                prompt_format=inputs["prompt_format"])
    return {"model_dir": out, "metrics": result.metrics, "checkpoint": result.checkpoint.path}
