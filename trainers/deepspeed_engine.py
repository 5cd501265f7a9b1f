"""The one place DeepSpeed touches the model: config filling, building under ZeRO-3 partitioned from the start
(``model_init_context``), ``deepspeed.initialize`` with a torch AdamW and an LR schedule, and safetensors
save/load of weights and ZeRO-partitioned optimizer state.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.library_log import import_quietly, prints_to_log
from trainers.safetensors_slices import read_range, tensor_index
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


@contextmanager
def model_init_context(ds_config: dict):
    """Build the model inside this; it yields the ``sharded`` argument of ``build_model``. Under ZeRO-3 every
    module is created under ``deepspeed.zero.Init`` (HF's integration, an alive ``HfDeepSpeedConfig``, does it
    for random-init builds), so parameters are partitioned as they are created. A checkpoint build skips the
    random init, and each rank reads only its own slice of every tensor; the vocabulary grows into partitioned
    rows and the new rows are written with one module whole at a time. Other stages: None, the model is built
    whole as before."""
    if zero_stage(ds_config) != 3:
        yield None
        return
    deepspeed = deepspeed_module()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from trainers.sharded_build import ShardedBuild

    _release_large_frees()
    hf_config = HfDeepSpeedConfig(ds_config)  # HF holds it by weak reference: ZeRO-3 init while this lives
    try:
        yield ShardedBuild(empty_init=lambda: _uninitialised_partitioned(ds_config), load_weights=load_partitioned,
                           gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0),
                           resize_vocabulary=lambda model, rows: _resize_vocabulary(model, rows, ds_config),
                           write_rows=_write_rows)
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def _release_large_frees() -> None:
    """zero.Init allocates each module whole and then partitions it: many short-lived buffers of a few MB. glibc's adaptive mmap threshold would serve them from the heap after the
    first free and keep the freed memory resident; a fixed 1 MiB threshold maps them and unmaps them on free."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextmanager
def _uninitialised_partitioned(ds_config: dict):
    """What HF's own ZeRO-3 ``from_pretrained`` builds under (``PreTrainedModel.get_init_context``): zero.Init,
    torch and HF weight init off, and the flag that keeps ``from_config`` from initialising the model afterwards
    by gathering every module in turn. Without it each rank would gather and rank 0 draw random weights for the
    whole model, only for the checkpoint to overwrite them."""
    deepspeed = deepspeed_module()
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    with (no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config),
          set_zero3_state()):
        yield


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return getattr(param, "ds_tensor", None) is not None


def _own_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """The flat element range [start, end) of the whole tensor that this rank's partition of ``param`` holds."""
    deepspeed = deepspeed_module()

    local = param.ds_tensor
    start = local.ds_numel * deepspeed.comm.get_rank(group=param.ds_process_group)
    return start, min(start + local.ds_numel, param.ds_numel)


def _fill_partition(param: torch.nn.Parameter, entry, name: str, grown: bool = False) -> None:
    """Copy this rank's slice of ``entry`` into a ZeRO-3 parameter's local partition (or the whole tensor into
    a parameter that is not partitioned). ``grown``: the saved rows are the first rows of a longer parameter (a
    vocabulary grown for new tokens), a prefix of the flat tensor; the rows after it are left as they are."""
    full = tuple(param.ds_shape) if _is_partitioned(param) else tuple(param.shape)
    saved = tuple(entry.shape)
    if saved != full and not (grown and saved[1:] == full[1:] and saved[0] <= full[0]):
        raise ValueError(f"{name}: saved shape {saved}, the model has {full}")
    with torch.no_grad():
        if not _is_partitioned(param):
            param[:saved[0]].copy_(read_range(entry, 0, entry.numel).view(saved).to(param.dtype))
            return
        start, end = _own_range(param)
        end = min(end, entry.numel)
        if end <= start:
            return
        local = param.ds_tensor.data[:end - start]
        if local.dtype == entry.dtype:
            read_range(entry, start, end, out=local)  # straight into the partition: no second copy
        else:
            local.copy_(read_range(entry, start, end))


def _write_rows(param: torch.nn.Parameter, ids: list[int], values: torch.Tensor) -> None:
    """Write ``values`` (one whole row per id, the same on every rank) at rows ``ids`` of a partitioned
    parameter: each rank writes only the part that falls in its own partition; no collective."""
    if not _is_partitioned(param):
        with torch.no_grad():
            param[ids] = values.to(param.dtype)
        return
    shape = tuple(param.ds_shape)
    width = math.prod(shape[1:])
    start, end = _own_range(param)
    local = param.ds_tensor.data
    values = values.reshape(len(ids), width).to(local.dtype)
    with torch.no_grad():
        for k, row in enumerate(ids):
            lo, hi = max(row * width, start), min((row + 1) * width, end)
            if lo < hi:
                local[lo - start:hi - start] = values[k, lo - row * width:hi - row * width]


class _Rows(torch.nn.Module):
    """One uninitialised parameter, so that zero.Init partitions it as the module is created."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))


def _grown(old: torch.nn.Parameter, rows: int, ds_config: dict) -> torch.nn.Parameter:
    """A partitioned parameter of ``rows`` rows whose first rows are ``old``'s. Only ``old`` is gathered (read,
    not written); each rank copies its own partition's range from it, so the new one is never whole."""
    deepspeed = deepspeed_module()

    shape = tuple(old.ds_shape) if _is_partitioned(old) else tuple(old.shape)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        new = _Rows((rows, *shape[1:]), old.dtype).weight
    new.requires_grad_(old.requires_grad)
    kept = min(rows, shape[0]) * math.prod(shape[1:])  # the old rows are a prefix of the flat tensor
    start, end = _own_range(new)
    end = min(end, kept)
    with deepspeed.zero.GatheredParameters([old], modifier_rank=None), torch.no_grad():
        if end > start:
            new.ds_tensor.data[:end - start].copy_(old.data.view(-1)[start:end])
    return new


def _resize_vocabulary(model, rows: int, ds_config: dict) -> None:
    """``resize_token_embeddings`` for a model built partitioned. HF's own makes the new embedding and head whole
    on every rank and leaves them so until ``deepspeed.initialize``, next to the gathered old ones; this one
    keeps them partitioned and never holds more than the old module's weight whole."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed.weight = _grown(embed.weight, rows, ds_config)
    embed.num_embeddings = rows
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            head.weight = _grown(head.weight, rows, ds_config)
            if getattr(head, "bias", None) is not None:
                head.bias = _grown(head.bias, rows, ds_config)
        head.out_features = rows
    model.config.get_text_config().vocab_size = rows
    if hasattr(model, "vocab_size"):
        model.vocab_size = rows
    gc.collect()  # the old partitions sit in reference cycles (DeepSpeed's per-parameter closures): free them now


def load_partitioned(model: torch.nn.Module, source: str | Path, names: set[str] | None = None,
                     grown: set[str] = frozenset()) -> None:
    """Fill ``model``'s parameters (all, or those in ``names``) from the safetensors file or folder ``source``,
    each rank reading only its own partition; no collective. Every parameter asked for must be saved; those in
    ``grown`` may have more rows than saved (see ``_fill_partition``)."""
    index = tensor_index(source)
    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    missing = [n for n, _ in params if n not in index]
    if missing:
        raise KeyError(f"{source}: no saved value for {len(missing)} parameters, e.g. {missing[:3]}")
    for name, param in params:
        _fill_partition(param, index[name], name, grown=name in grown)
    log.info("partitioned load: %d tensors from %s", len(params), source)


def host_rss() -> dict[str, int]:
    """This process's resident set now and its peak so far (VmRSS, VmHWM), in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields.get("VmRSS", 0), "peak_rss_bytes": fields.get("VmHWM", 0)}


def model_host_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters this rank holds on its host (its ZeRO-3 partitions, or whole tensors) and of the
    whole model."""
    held = whole = 0
    for p in model.parameters():
        size = p.element_size()
        if _is_partitioned(p):
            held += p.ds_tensor.numel() * size if p.ds_tensor.device.type == "cpu" else 0
            whole += p.ds_numel * size
        else:
            held += p.numel() * size if p.device.type == "cpu" else 0
            whole += p.numel() * size
    return {"params_on_host_bytes": held, "model_bytes": whole}


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
    deepspeed = deepspeed_module()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    schedule = lr_lambda(optim.warmup_steps, optim.total_steps, optim.lr_schedule)
    with prints_to_log():  # "DeepSpeed ... built successfully", once per communication backend
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
    deepspeed = deepspeed_module()

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

    deepspeed = deepspeed_module()

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
    """Load saved weights into a plain (not yet DeepSpeed-wrapped) module; every saved name must match. A module
    built partitioned (ZeRO-3) reads only its own slices."""
    from safetensors.torch import load_file

    if any(_is_partitioned(p) for p in module.parameters()):
        saved = set(tensor_index(path))
        expected = set(_trainable_names(module)) if trainable_only else {n for n, _ in module.named_parameters()}
        unknown = saved - {n for n, _ in module.named_parameters()}
        if unknown:
            raise KeyError(f"{path}: {len(unknown)} saved tensors match no parameter, e.g. {sorted(unknown)[:3]}")
        load_partitioned(module, path, expected)
        return

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


def deepspeed_module():
    """The deepspeed module, imported with its load-time notices (accelerator choice, a console handler of its
    own) sent to run_dir/logs/libraries.log, in the driver as in the workers."""
    import sys

    import_quietly("deepspeed")
    return sys.modules["deepspeed"]


def configure_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; pin it to CPU where there is no CUDA. It is imported here, its
    load-time notices going to run_dir/logs/libraries.log (data_pipeline/library_log.py)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_quietly("deepspeed")


def full_parameters(engine):
    """A context in which every rank holds the whole model (ZeRO-3 gathers it; other stages already do), for
    scoring code that reads weights directly, such as the beam search's own prefill."""
    deepspeed = deepspeed_module()

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None,
                                             enabled=zero_stage(engine.config) == 3)
