"""`recllm train`: the one module that speaks to Ray Train. Builds the TorchTrainer (workers, CPU or GPU,
gloo or NCCL, failure and checkpoint policy), runs `ray_worker.train_loop_per_worker`, and exports the
final checkpoint to `run_dir/model/`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.library_log import verbose
from data_pipeline.ray_session import connect_ray, ray_train_log_level
from data_pipeline.run_layout import TrainLayout
from trainers.resume_point import latest_checkpoint, ray_storage

log = logging.getLogger("recllm.train")


def training_inputs(cfg) -> dict:
    """What the workers of ``train.objective`` need besides the config, read and checked before Ray starts."""
    from trainers.recipes.registry import objective_class

    return objective_class(cfg.train.objective).inputs(cfg)


def item_softmax(cfg) -> str:
    """What the objective trains an item code token's probability against (``PromptFormat.item_softmax``), so
    that inference and the valid rounds normalise beam scores the same way; next-token objectives: vocabulary."""
    from trainers.recipes.registry import objective_class

    return objective_class(cfg.train.objective).item_softmax(cfg)


def worker_shape(train) -> dict:
    """How many workers, what each reserves and which collective backend: GPU + NCCL when train.use_gpu, else
    CPU + gloo. Pure, so a test (or `plan`) sees what ``run_training`` gives Ray without starting it."""
    return {"num_workers": train.num_workers, "use_gpu": train.use_gpu,
            "resources_per_worker": {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
            "backend": "nccl" if train.use_gpu else "gloo"}


def worker_env(train, repo: Path) -> dict:
    """The workers' environment: this checkout on PYTHONPATH, object-store credentials, DeepSpeed pinned to the
    CPU accelerator unless training on GPUs."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in os.environ:  # object-store endpoint and credentials reach the workers too
        if key in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") or key.startswith("AWS_"):
            env[key] = os.environ[key]
    if not train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if not verbose():
        # Ray Train turns every print in the workers into a root-logger line on the console; recllm's workers do not
        # print, so what does (DeepSpeed's "built successfully") stays with stdout, which goes to the log file
        env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def run_training(cfg) -> dict:
    """Train ``train.objective`` through the one worker loop: the recipe (trainers/recipes/recipe.py) reads its
    inputs, names its train folder and exports the chosen checkpoint."""
    from trainers.recipes.registry import objective_class

    t = cfg.train
    objective_cls = objective_class(t.objective)
    inputs = objective_cls.inputs(cfg)  # checked before Ray is even imported

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.ray_worker import train_loop_per_worker

    train_dir = objective_cls.train_dir(cfg)
    repo = Path(__file__).resolve().parents[1]
    connect_ray(worker_env(t, repo))
    storage_uri = TrainLayout(train_dir).ray
    storage_path, storage_fs = ray_storage(storage_uri)
    if not t.resume:
        # A fresh run must not export an earlier run's best round, nor continue its checkpoints: Ray Train
        # restores a run silently from the latest checkpoint under the same storage_path and name.
        storage.remove(TrainLayout(train_dir).best)
        storage.remove(storage_uri)
    resume_from = None
    if t.resume:
        found = latest_checkpoint(storage_uri)
        if found is None:
            raise DataError(storage_uri, "train.resume=true but no checkpoint here")
        path = found[0]
        resume_from = ray.train.Checkpoint(ray_storage(path)[0], filesystem=storage_fs)
        log.info("resuming from %s", path)
    shape = worker_shape(t)
    deepspeed_config = str((repo / t.deepspeed_config) if not Path(t.deepspeed_config).is_absolute()
                           else Path(t.deepspeed_config))
    if not Path(deepspeed_config).exists():
        deepspeed_config = str(Path(t.deepspeed_config).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The class itself travels to the workers, so an objective registered outside the project (a user's
        # module, a test) trains without an edit here.
        train_loop_config={"cfg": cfg, "deepspeed_config": deepspeed_config, **inputs, "train_dir": train_dir,
                           "objective_cls": objective_cls,
                           "fault": {k: v for k, v in os.environ.items() if k.startswith("RECLLM_FAULT_")}},
        scaling_config=ScalingConfig(num_workers=shape["num_workers"], use_gpu=shape["use_gpu"],
                                     resources_per_worker=shape["resources_per_worker"]),
        torch_config=TorchConfig(backend=shape["backend"]),
        run_config=RunConfig(name="sft", storage_path=storage_path, storage_filesystem=storage_fs,
                             logging_config=LoggingConfig(log_level=ray_train_log_level()),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        resume_from_checkpoint=resume_from,
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        out = objective_cls.export(cfg, ckpt, inputs, train_dir)
    return {"model_dir": out, "metrics": result.metrics, "checkpoint": result.checkpoint.path}
