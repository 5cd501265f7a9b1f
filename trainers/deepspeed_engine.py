"""The one place DeepSpeed touches the model: config filling, ``deepspeed.initialize`` with a torch AdamW and
an LR schedule, and safetensors save/load of weights and ZeRO-partitioned optimizer state.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.state_io import load_state, save_state
from trainers.train_config import TrainConfig

log = logging.getLogger("recllm.train")


def deepspeed_config(cfg: TrainConfig, path: str, bf16: bool) -> dict:
    """The JSON at ``path`` with its "auto" values filled from the train section."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"train.deepspeed_config: cannot read {path}: {exc}") from None
    fill = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    ds["zero_allow_untested_optimizer"] = True
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    """Multiplier of the peak LR at each step: linear warm-up, then constant, cosine or linear decay."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@dataclass(frozen=True)
class OptimizerSettings:
    """What ``wrap_model`` needs to build the optimizer and its LR schedule, and nothing else."""

    learning_rate: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    lr_schedule: str = "cosine"

    @classmethod
    def of(cls, train: TrainConfig) -> "OptimizerSettings":
        return cls(train.learning_rate, train.weight_decay, train.warmup_steps, train.max_steps, train.lr_schedule)


def wrap_model(model: torch.nn.Module, optim: OptimizerSettings, ds_config: dict):
    """(engine, optimizer, scheduler). A torch AdamW avoids compiling DeepSpeed's fused ops."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    schedule = lr_lambda(optim.warmup_steps, optim.total_steps, optim.lr_schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    log.info("DeepSpeed ZeRO-%d, micro batch %d x %d accumulation, bf16=%s", zero_stage(ds_config),
             ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"],
             ds_config.get("bf16", {}).get("enabled"))
    return engine, optimizer, scheduler


def _trainable_names(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def gathered_state(engine, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) weights on rank 0, None elsewhere; every rank must call it (ZeRO-3 gathers)."""
    import deepspeed

    module = engine.module
    names = set(_trainable_names(module)) if trainable_only else None
    params = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None,
                                           enabled=zero_stage(engine.config) == 3):
        if rank != 0:
            return None
        state = {n: p.detach().cpu().clone() for n, p in params}
    if not trainable_only:  # buffers that are part of the state (none in LLaMA, but keep the contract)
        state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers()
                      if n in module.state_dict()})
    return state


def param_digest(engine) -> str:
    """sha256 over every parameter as this rank sees it after gathering (ZeRO-3); equal on all ranks when
    the replicas agree."""
    import hashlib

    import deepspeed

    digest = hashlib.sha256()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None,
                                           enabled=zero_stage(engine.config) == 3):
        for name, p in params:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shared tensors (a tied head) once, under the first name."""
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.contiguous()
    return unique


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights by parameter name as a safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_unique_tensors(state), str(path))


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The same safetensors file as bytes, for writers that go through data_pipeline.storage."""
    from safetensors.torch import save

    return save(_unique_tensors(state))


def load_weights(module: torch.nn.Module, path: Path, trainable_only: bool) -> None:
    """Load saved weights into a plain (not yet DeepSpeed-wrapped) module; every saved name must match."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(module.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"{path}: {len(missing)} saved tensors match no parameter, e.g. {missing[:3]}")
    expected = set(_trainable_names(module)) if trainable_only else set(params)
    ptrs = {params[n].data_ptr() for n in state}
    absent = [n for n in expected if n not in state and params[n].data_ptr() not in ptrs]
    if absent:
        raise KeyError(f"{path}: no saved value for {len(absent)} parameters, e.g. {absent[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


def save_optimizer(engine, scheduler, prefix: Path) -> None:
    save_state({"optimizer": engine.optimizer.state_dict(), "scheduler": scheduler.state_dict()}, prefix)


def load_optimizer(engine, scheduler, prefix: Path) -> None:
    live = {"optimizer": engine.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    state = load_state(prefix, live)
    if zero_stage(engine.config) in (1, 2, 3):
        # ZeRO reads entry [dp_rank] of a per-rank list; each rank restores its own partition (the same
        # world size is required: the loader state checks it).
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        engine.optimizer.load_state_dict([state["optimizer"]] * world, load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def configure_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; pin it to CPU where there is no CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def full_parameters(engine):
    """A context in which every rank holds the whole model (ZeRO-3 gathers it; other stages already do), for
    scoring code that reads weights directly, such as the beam search's own prefill."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None,
                                             enabled=zero_stage(engine.config) == 3)
