"""`recllm train`: the one module that speaks to Ray Train. Builds the TorchTrainer (workers, CPU or GPU,
gloo or NCCL, failure and checkpoint policy), runs `ray_worker.train_loop_per_worker`, and exports the
final checkpoint to `run_dir/model/`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.item_ids.item_codes import item_ids_files, read_item_ids_checked
from data_pipeline.library_log import verbose
from data_pipeline.ray_session import connect_ray, ray_train_log_level
from data_pipeline.run_layout import STATS_FILE, RunLayout
from data_pipeline.samples.prompt_format import PromptFormat
from trainers.model_files import check_checkpoint
from trainers.resume_point import latest_checkpoint, ray_storage

log = logging.getLogger("recllm.train")


def read_samples_manifest(run_dir: str, item_ids_dir: str) -> dict:
    """samples/manifest.json, after checking that samples/ holds exactly the files it lists, byte for byte (a
    shard from another run is refused) and that item_ids/ is the one the samples were written from."""
    layout = RunLayout(run_dir)
    samples_dir, uri = layout.samples, layout.samples_manifest
    manifest = storage.read_json(uri, "not found; run `recllm build-samples` first")
    if manifest.get("files"):
        storage.verify_files(samples_dir, manifest["files"], uri, "rerun `recllm build-samples`")
    stats_uri = storage.join(item_ids_dir, STATS_FILE)
    current = item_ids_files(storage.read_json(stats_uri)) if storage.exists(stats_uri) else {}
    for rel, sha in manifest.get("item_ids", {}).items():
        if rel in current and current[rel] != sha:
            raise DataError(uri, f"samples were written from another item_ids/{rel} than {item_ids_dir} holds now "
                                 "(build-ids ran again since); rerun `recllm build-samples`", field="item_ids")
    return manifest


def training_inputs(cfg) -> dict:
    """What every worker needs besides the config: new tokens, their texts, the task list, the prompt format.
    Every input is read and checked here, before Ray starts, so a bad one is one line naming the file."""
    run_dir = storage.absolute(cfg.run_dir)
    layout = RunLayout(run_dir)
    codes, new_tokens = read_item_ids_checked(layout.item_ids)
    manifest = read_samples_manifest(run_dir, layout.item_ids)
    check_checkpoint(cfg.model, new_tokens, layout.tokens)
    tasks = list(manifest["config"]["tasks"])
    sequence = "user_sequence" in tasks
    prompt_format = PromptFormat(
        style="sequence" if sequence else "instruction",
        max_history=manifest["config"].get("max_sequence_items", 50) if sequence
        else manifest["config"]["max_history_in_prompt"],
        item_softmax=item_softmax(cfg), item_rerank=item_rerank(cfg))
    token_texts = None
    if cfg.model.new_token_init == "text":
        items = storage.read_parquet(layout.items, ["item_id", "title"])
        titles = {r["item_id"]: r["title"] for r in items.to_pylist() if r["title"]}
        rows = codes.select(["item_id", "tokens"]).to_pylist() if codes is not None else []
        token_texts = {row["tokens"][0]: titles[row["item_id"]] for row in rows
                       if len(row["tokens"]) == 1 and row["item_id"] in titles}
    token_vectors = collaborative_vectors(cfg, run_dir, new_tokens) if cfg.model.new_token_init == "collab" else None
    return {"run_dir": run_dir, "new_tokens": new_tokens, "tasks": tasks, "token_texts": token_texts,
            "token_vectors": token_vectors, "prompt_format": prompt_format}


def item_softmax(cfg) -> str:
    """What the objective trains an item code token's probability against (``PromptFormat.item_softmax``), so
    that inference and the valid rounds normalise beam scores the same way; next-token objectives: vocabulary."""
    from trainers.recipes.registry import objective_class

    rule = getattr(objective_class(cfg.train.objective), "item_softmax", None)
    return rule(cfg) if rule is not None else "vocabulary"


def item_rerank(cfg) -> str:
    """Whether beam search adds the flat item score the objective trained (``PromptFormat.item_rerank``)."""
    from trainers.recipes.registry import objective_class

    rule = getattr(objective_class(cfg.train.objective), "item_rerank", None)
    return rule(cfg) if rule is not None else "none"


def collaborative_vectors(cfg, run_dir: str, new_tokens: list[str]) -> dict[str, np.ndarray]:
    """model.new_token_init=collab: token -> collaborative vector. Semantic code tokens take their codebook
    vectors (item_ids/codebook.safetensors); single-token items (atomic IDs) the baseline SASRec's item vectors
    (run_dir/baseline, trained with this run's settings)."""
    from data_pipeline.baseline_files import baseline_settings, read_item_embeddings
    from data_pipeline.item_ids.build_ids import load_codebook
    from data_pipeline.item_ids.item_codes import semantic_vocabulary

    layout = RunLayout(run_dir)
    if storage.exists(layout.codebook):
        codebooks = load_codebook(layout.item_ids)[0]["codebooks"].float().numpy()  # [levels, codes, dim]
        levels, codes, _ = codebooks.shape
        return {t: codebooks[k // codes, k % codes] for k, t in enumerate(semantic_vocabulary(levels, codes))}
    vectors, _ = read_item_embeddings(run_dir, baseline_settings(cfg.baseline, cfg.seed))
    table = storage.read_parquet(layout.item_codes, ["item_id", "tokens"]).to_pylist()
    single = {row["tokens"][0]: vectors[row["item_id"]] for row in table if len(row["tokens"]) == 1}
    if not single:
        raise DataError(layout.item_codes, "model.new_token_init=collab needs atomic item "
                        "tokens or a semantic codebook; this scheme has neither")
    return single


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


def default_train_dir(cfg) -> str:
    return RunLayout(storage.absolute(cfg.run_dir)).train


def export_language_model(cfg, checkpoint_dir, inputs: dict, train_dir: str) -> str:
    """The default ``export``: run_dir/model/, a Hugging Face folder (see export_model)."""
    from trainers.deepspeed_engine import deepspeed_module
    from trainers.export_model import export_checkpoint

    deepspeed_module()  # the export's model build imports it; its load-time notices go to the log file
    return export_checkpoint(cfg, checkpoint_dir, inputs["new_tokens"], inputs["token_texts"],
                             prompt_format=inputs["prompt_format"])


def run_training(cfg) -> dict:
    """Train ``train.objective`` through the one worker loop; the recipe's optional hooks (``inputs``,
    ``train_dir``, ``export``; see recipes/registry.py) replace the language-model defaults."""
    from trainers.recipes.registry import objective_class

    t = cfg.train
    objective_cls = objective_class(t.objective)
    inputs = getattr(objective_cls, "inputs", training_inputs)(cfg)  # checked before Ray is even imported

    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.ray_worker import train_loop_per_worker

    train_dir = getattr(objective_cls, "train_dir", default_train_dir)(cfg)
    repo = Path(__file__).resolve().parents[1]
    connect_ray(worker_env(t, repo))
    storage_uri = storage.join(train_dir, "ray")
    storage_path, storage_fs = ray_storage(storage_uri)
    if not t.resume:
        # A fresh run must not export an earlier run's best round, nor continue its checkpoints: Ray Train
        # restores a run silently from the latest checkpoint under the same storage_path and name.
        storage.remove(storage.join(train_dir, "best"))
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
        out = getattr(objective_cls, "export", export_language_model)(cfg, ckpt, inputs, train_dir)
    return {"model_dir": out, "metrics": result.metrics, "checkpoint": result.checkpoint.path}
