"""`recllm plan`: a dry run of `recllm train`. Counts parameters of the configured model on the meta device
(vocabulary extension included; a checkpoint's shape from its config.json alone), then estimates memory per GPU
for weights, gradients, optimizer state and activations under the chosen ZeRO stage and cluster shape. Needs no
GPU and no weights, and starts nothing. A recipe that is not a packed language-model run (LoID) describes its
own step as a ``Workload`` (its objective's ``memory_workloads`` hook), planned by the same arithmetic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024 ** 3
CUDA_CONTEXT_BYTES = 1.5 * GIB
"""CUDA context, NCCL buffers and kernels' workspace, per GPU."""
FRAGMENTATION = 1.10
"""Allocator slack on top of the live bytes."""


class PlanError(ValueError):
    """The configured run cannot fit; the message says what to change."""


@dataclass
class Workload:
    """One training run of a recipe that is not a packed language-model run, as an objective's optional
    ``memory_workloads(cfg)`` hook describes it: the LM is frozen but for one LoRA adapter, and the recipe adds
    trainable parts beside it."""

    recipe: str
    """The recipe's name in the plan ("LoID")."""
    run: str
    """The run's name ("loid_plugin")."""
    tokens_per_micro_batch: int
    """Positions the LM runs forward and backward per micro-batch (every pass of the step together)."""
    lora_r: int
    lora_target_modules: list[str]
    added: dict[str, int]
    """Trainable parameters outside the LM, by part (ID embeddings, projections, a head)."""
    frozen_adapters: int = 0
    """Frozen LoRA adapters of the same rank and modules beside the trainable one (LoID's source plugins)."""
    lora_input_copies: bool = False
    """Whether the adapters keep a dropped-out copy of their input (LoRA dropout > 0)."""
    gradient_checkpointing: bool = False
    """Whether the recipe's model recomputes layers in backward."""
    logits: bool = False
    """Whether the step computes logits over the vocabulary (LoID pools hidden states instead)."""
    new_tokens: int = 0
    note: str = ""
    """Where its sizes came from (`recllm plan`'s first line)."""
    hints: list[str] = field(default_factory=list)
    """What to change when it does not fit."""


@dataclass
class MemoryPlan:
    size: str
    """The size name, or the checkpoint's model_type and config.json."""
    world_size: int
    nodes: int
    zero_stage: int
    dtype_bytes: int
    total_params: int
    base_params: int
    """Parameters before the new tokens' rows."""
    trainable_params: int
    new_tokens: int
    tokens_per_micro_batch: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    gpu_memory: float
    workload: Workload | None = None
    """Set when a recipe's workload was planned instead of the packed language-model run."""
    lora_params: int = 0
    """The trainable adapter's parameters (a workload's; each frozen adapter has as many)."""

    @property
    def total(self) -> float:
        live = self.weights + self.gradients + self.optimizer + self.activations + self.logits
        return live * FRAGMENTATION + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def table(self) -> str:
        rows = [("parameters (weights)", self.weights), ("gradients", self.gradients),
                ("optimizer state (fp32 master + Adam m, v)", self.optimizer), ("activations", self.activations),
                ("logits, fp32 copy + gradients", self.logits),
                (f"CUDA context + {int((FRAGMENTATION - 1) * 100)}% allocator slack",
                 self.overhead + (self.total - self.overhead) * (1 - 1 / FRAGMENTATION)),
                ("total per GPU", self.total), ("GPU memory", self.gpu_memory)]
        head = self._workload_head() if self.workload is not None else (
            f"model {self.size}: {self.total_params:,} parameters ({self.base_params:,} + "
            f"{self.total_params - self.base_params:,} for {self.new_tokens:,} new tokens), "
            f"{self.trainable_params:,} trainable")
        cluster = (f"{self.world_size} GPUs on {self.nodes} node(s), ZeRO-{self.zero_stage}, "
                   f"{'bf16' if self.dtype_bytes == 2 else 'fp32'}, {self.tokens_per_micro_batch:,} tokens per micro-batch")
        lines = [head, cluster] + [f"  {name:48s} {value / GIB:9.2f} GiB" for name, value in rows]
        lines.append(f"  {'fits' if self.fits else 'DOES NOT FIT'}")
        return "\n".join(lines)

    def _workload_head(self) -> str:
        """The recipe and run, then what trains and what stays frozen, each with its parameters."""
        w = self.workload
        trained = [f"LoRA r={w.lora_r} on {', '.join(w.lora_target_modules)} ({self.lora_params:,})"]
        trained += [f"{name} ({count:,})" for name, count in w.added.items()]
        frozen = f"the LM ({self.base_params:,})"
        if w.frozen_adapters:
            frozen += f" and {w.frozen_adapters} adapter(s) ({w.frozen_adapters * self.lora_params:,})"
        return (f"model {self.size}, {w.recipe} run {w.run}: {self.total_params:,} parameters, "
                f"{self.trainable_params:,} trainable: {', '.join(trained)}; frozen: {frozen}")


def model_shape(model_cfg, shape=None):
    """(label, Hugging Face config before the new tokens) of the configured model. ``shape`` (a ``LlamaShape``
    no size names, as the GPU suite plans Llama-3.1-8B) wins; then a checkpoint's config.json alone (any size: a
    named one was checked to match it); otherwise the built-in shape."""
    from trainers import models

    if shape is not None:
        return "custom shape", shape.llama_config()
    if model_cfg.checkpoint:
        config = models.checkpoint_config(model_cfg.checkpoint)
        return f"{config.model_type} ({Path(model_cfg.checkpoint) / 'config.json'})", config
    shapes = {"llama2_7b": models.LLAMA2_7B, "llama2_13b": models.LLAMA2_13B, "smollm2_135m": models.SMOLLM2_135M}
    if model_cfg.size == "tiny":
        t = model_cfg.tiny
        vocab = len(json.loads((models.TINY_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]["vocab"])
        shape = models.LlamaShape(t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size,
                                  vocab, t.max_position_embeddings, t.tie_embeddings)
    else:
        shape = shapes[model_cfg.size]
    return model_cfg.size, shape.llama_config()


def meta_model(config, new_tokens: int):
    """The architecture of ``config`` on the meta device with ``new_tokens`` more vocabulary rows (after the
    config's ``vocab_size``; a Qwen checkpoint's spare rows would take a few hundred of them: an over-estimate)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    grown = copy.deepcopy(config)
    grown.vocab_size = config.vocab_size + new_tokens
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(grown)


def trainable_count(model, config, cfg, new_tokens: int) -> int:
    t = cfg.train
    if t.finetune == "full":
        return sum(p.numel() for p in model.parameters())
    return lora_count(model, t.lora_r, t.lora_target_modules) + new_tokens * _row_params(config)


def lora_count(model, r: int, target_modules) -> int:
    """Parameters of one rank-``r`` LoRA adapter on every Linear named one of ``target_modules``: A (r x in)
    and B (out x r)."""
    import torch

    return sum(r * (module.in_features + module.out_features) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)


def _row_params(config) -> int:
    """Parameters of one vocabulary row: the embedding's, and the head's when untied."""
    return config.hidden_size * (1 if config.tie_word_embeddings else 2)


LOGIT_BYTES = 12
"""Per token and vocabulary row: the 16-bit logits, their fp32 copy for the loss, and its fp32 and 16-bit
gradients. Measured with the activations below on an H100 (bench/RESULTS.md, GPU suite of 2026-11-24)."""
LORA_INPUTS = {"q_proj": "h", "k_proj": "h", "v_proj": "h", "o_proj": "h", "gate_proj": "h", "up_proj": "h",
               "down_proj": "i"}
"""The input width of each adapted projection (hidden or intermediate): LoRA keeps a dropped-out copy of it."""


def activation_bytes_per_token(h: int, intermediate: int, lora_inputs) -> float:
    """Bytes one decoder layer keeps per token for backward, in 16-bit, as Hugging Face's LLaMA runs it (RMSNorm
    in fp32, unfused SwiGLU, SDPA or FlexAttention keeping no s x s matrix): 16 h + 16 i, plus 2 bytes per input
    element of every LoRA-adapted projection. Fitted to the GPU suite's peaks on an H100 (SmolLM2-135M full,
    LLaMA-2-7B and Llama-3.1-8B LoRA, 4,096-token rows; every attention path, checkpointing on and off):
    measured / plan is 0.84-1.06 there, where Korthikanti et al.'s 34 h (GPT's fused 4h MLP) gave 1.02-1.85.
    ``lora_inputs``: the adapted projections whose input LoRA copies (none without LoRA or its dropout)."""
    per_token = 16 * h + 16 * intermediate
    per_token += sum(2 * (intermediate if LORA_INPUTS.get(m) == "i" else h) for m in lora_inputs)
    return per_token


def plan_memory(cfg, new_tokens: int, shape=None, workload: Workload | None = None) -> MemoryPlan:
    """Per-GPU memory of the configured run: the packed language-model run with ``new_tokens`` more vocabulary
    rows, or ``workload`` (a recipe's own step; its new tokens then). ``shape`` replaces ``model.size``'s shape
    (the GPU suite plans Llama-3.1-8B this way)."""
    from trainers.deepspeed_engine import deepspeed_config, zero_stage

    t = cfg.train
    repo = Path(__file__).resolve().parents[1]
    ds_path = Path(t.deepspeed_config) if Path(t.deepspeed_config).is_absolute() else repo / t.deepspeed_config
    stage = zero_stage(deepspeed_config(t, str(ds_path), bf16=t.use_gpu))
    label, config = model_shape(cfg.model, shape)
    new_tokens = workload.new_tokens if workload is not None else new_tokens
    model = meta_model(config, new_tokens)
    lm_params = sum(p.numel() for p in model.parameters())
    total, lora = lm_params, 0
    if workload is None:
        trainable = trainable_count(model, config, cfg, new_tokens)
        tokens, checkpointing, has_logits = t.micro_batch_size * t.seq_len, t.gradient_checkpointing, True
        lora_inputs = t.lora_target_modules if t.finetune == "lora" else ()
    else:
        lora = lora_count(model, workload.lora_r, workload.lora_target_modules)
        added = sum(workload.added.values())
        total += lora * (1 + workload.frozen_adapters) + added
        trainable = lora + added + new_tokens * _row_params(config)
        tokens, checkpointing = workload.tokens_per_micro_batch, workload.gradient_checkpointing
        has_logits = workload.logits
        lora_inputs = workload.lora_target_modules if workload.lora_input_copies else ()
    n = t.num_workers
    b = 2 if (t.use_gpu or cfg.model.dtype in ("bfloat16", "float16")) else 4
    weights = total * b / (n if stage >= 3 else 1)
    gradients = trainable * b / (n if stage >= 2 else 1)
    optimizer = trainable * 12 / (n if stage >= 1 else 1)
    h, layers = config.hidden_size, config.num_hidden_layers
    per_layer = activation_bytes_per_token(h, config.intermediate_size, lora_inputs) * tokens * b / 2
    # Checkpointing keeps one layer's input per layer, plus one layer recomputed at a time.
    activations = (2 * h * tokens * b / 2) * layers + per_layer if checkpointing else per_layer * layers
    logits = tokens * (config.vocab_size + new_tokens) * LOGIT_BYTES if has_logits else 0
    base = lm_params - new_tokens * _row_params(config)
    return MemoryPlan(label, n, math.ceil(n / t.gpus_per_node), stage, b, total, base, trainable, new_tokens,
                      tokens, weights, gradients, optimizer, activations, logits, CUDA_CONTEXT_BYTES,
                      t.gpu_memory_gb * GIB, workload, lora)


def check_plan(plan: MemoryPlan, cfg) -> None:
    if plan.fits:
        return
    hints = list(plan.workload.hints) if plan.workload is not None else _language_model_hints(plan, cfg)
    hints.append("more GPUs (train.num_workers)")
    run = f"{plan.workload.recipe} run {plan.workload.run} " if plan.workload is not None else ""
    raise PlanError(f"{run}does not fit: {plan.total / GIB:.1f} GiB per GPU needed, {plan.gpu_memory / GIB:.0f} GiB "
                    f"available (train.gpu_memory_gb). Try: {', '.join(hints)}")


def _language_model_hints(plan: MemoryPlan, cfg) -> list[str]:
    hints = []
    if plan.zero_stage < 3:
        hints.append("train.deepspeed_config=configs/deepspeed/zero3.json")
    if not cfg.train.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    if cfg.train.micro_batch_size > 1:
        hints.append(f"train.micro_batch_size={max(1, cfg.train.micro_batch_size // 2)}")
    if cfg.train.finetune == "full":
        hints.append("train.finetune=lora")
    return hints
