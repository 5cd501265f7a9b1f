"""The nightly job's capacity plan (issue #29), printed by `recllm plan`: users/s per GPU and memory per replica for
the configured model, scorer, beams, code levels and catalogue, and the GPU-hours and wall time of a night of
``infer.plan_users`` users on ``infer.plan_gpus`` GPUs. Rates come from the measured table shipped beside this file
(``measured_rates.json``: device, date, source). Where the configured shape differs from every measured one, the
rate of the measured row nearest in size is scaled by the ratio of matmul FLOPs per user (ranking/search_flops.py)
and marked as scaled; below the smallest measured model it is capped at that model's rate (a GPU is bound by kernel
launches there, not FLOPs). Reads no weight: the shape comes from memory_plan.model_shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ranking.search_flops import beam_search_flops, multinomial_flops
from trainers.flop_count import matmul_parameters

RATES_FILE = Path(__file__).with_name("measured_rates.json")
GIB = 1024 ** 3
PROMPT_FRAME_TOKENS = 8
"""Tokens of a prompt besides its history items (BOS, the frame's words, the separator): the estimate's constant."""


@dataclass(frozen=True)
class Workload:
    """One nightly scoring job, in the terms its cost depends on."""

    scorer: str
    """beam | multinomial."""
    beams: int
    levels: int
    """Code tokens per item (the trie's depth; 1 for atomic IDs)."""
    items: int
    new_tokens: int
    """Rows added to the vocabulary (item/code tokens)."""
    prompt_tokens: float
    users_per_batch: int

    def flops_per_user(self, config) -> float:
        grown = _grown(config, self.new_tokens)
        if self.scorer == "beam":
            return beam_search_flops(grown, self.prompt_tokens, self.levels, self.beams)["ours"]
        return multinomial_flops(grown, self.prompt_tokens, self.items)


@dataclass(frozen=True)
class InferPlan:
    model: str
    workload: Workload
    users_per_s: float
    basis: str
    """Where the rate comes from: the measured row, or the row it was scaled from and by how much."""
    replica_bytes: dict[str, float]
    users: int
    gpus: int
    device: str

    @property
    def gpu_hours(self) -> float:
        return self.users / self.users_per_s / 3600

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.gpus

    def lines(self) -> list[str]:
        w = self.workload
        search = f"beam {w.beams} over {w.levels} code level(s)" if w.scorer == "beam" else "multinomial head"
        memory = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.replica_bytes.items())
        return [f"nightly infer on {self.device}: {self.model}, {search}, {w.items:,} items, "
                f"~{w.prompt_tokens:.0f}-token prompts, {w.users_per_batch} users a batch",
                f"  {self.users_per_s:,.1f} users/s per GPU ({self.basis})",
                f"  memory per replica {sum(self.replica_bytes.values()) / GIB:.2f} GiB ({memory} GiB)",
                f"  {self.users:,} users: {self.gpu_hours:,.1f} GPU-hours, {_duration(self.wall_hours)} on "
                f"{self.gpus} GPU(s)"]


def measured_rates(path: Path = RATES_FILE) -> dict:
    return json.loads(path.read_text())


def _grown(config, new_tokens: int):
    import copy

    grown = copy.copy(config)
    grown.vocab_size = config.vocab_size + new_tokens
    return grown


def _measured_workload(row: dict) -> Workload:
    return Workload(row["scorer"], row.get("beams", 1), row.get("levels", 1), row["items"], row["new_tokens"],
                    row["prompt_tokens"], row["users_per_batch"])


def rate(model: str, config, workload: Workload, table: dict, shape_of) -> tuple[float, str]:
    """(users/s per GPU, its basis) from the measured rows of ``workload.scorer``; ``shape_of(name)`` gives a
    measured model's Hugging Face config."""
    rows = [r for r in table["rows"] if r["scorer"] == workload.scorer]
    if not rows:
        raise ValueError(f"{RATES_FILE.name}: no measured row for scorer {workload.scorer!r}")
    size = matmul_parameters(config)
    row = min(rows, key=lambda r: abs(math.log(matmul_parameters(shape_of(r["model"])) / size)))
    measured = _measured_workload(row)
    if row["model"] == model and measured == workload:
        return row["users_per_s"], f"measured, {table['date']}"
    ratio = measured.flops_per_user(shape_of(row["model"])) / workload.flops_per_user(config)
    smallest = min(rows, key=lambda r: matmul_parameters(shape_of(r["model"])))
    if ratio > 1 and row is smallest:
        return row["users_per_s"], (f"{row['model']}'s measured rate, {table['date']}: a smaller model is "
                                    f"launch-bound, not faster by its {ratio:.2g}x fewer FLOPs")
    return row["users_per_s"] * ratio, (f"scaled by FLOPs from {row['model']} measured {table['date']} "
                                        f"({row['users_per_s']:,.1f} users/s x {ratio:.3g})")


def replica_bytes(config, workload: Workload, tied: bool) -> dict[str, float]:
    """bf16 weights with the new rows, the bf16 KV cache of one batch of users (and their beams), and the fp32
    scores of one step."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    vocab = config.vocab_size + workload.new_tokens
    params = matmul_parameters(_grown(config, workload.new_tokens)) + (0 if tied else hidden * vocab)
    beam = workload.scorer == "beam"
    # the LLaMA-family decoder keeps one copy of a user's prompt keys/values for all its beams
    # (ranking/beam_decoders.SharedPromptDecoder); each beam adds its own code tokens
    tokens = workload.prompt_tokens + (workload.beams * workload.levels if beam else 0)
    kv_cache = workload.users_per_batch * tokens * config.num_hidden_layers * 2 * kv_dim * 2
    rows = workload.users_per_batch * (workload.beams if beam else 1)
    scores = rows * (vocab if beam else workload.items) * 4
    return {"weights": 2.0 * params, "kv cache": float(kv_cache), "scores": float(scores)}


def plan_infer(cfg, model: str, config, items: int, new_tokens: int, table: dict | None = None,
               shape_of=None) -> InferPlan:
    """The plan for ``cfg.infer`` on ``model`` (label) of Hugging Face ``config``, over ``items`` items with
    ``new_tokens`` vocabulary rows (the caller counts them: atomic IDs add one per item, semantic ones
    levels x codes)."""
    i = cfg.infer
    table = table or measured_rates()
    shape_of = shape_of or _measured_shape
    levels = cfg.ids.levels if cfg.ids.scheme == "semantic" else 1
    workload = Workload(i.scorer, i.num_beams if i.scorer == "beam" else 1, levels, items, new_tokens,
                        i.max_history * levels + PROMPT_FRAME_TOKENS, i.batch_size)
    users_per_s, basis = rate(model, config, workload, table, shape_of)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return InferPlan(model, workload, users_per_s, basis, replica_bytes(config, workload, tied), i.plan_users,
                     i.plan_gpus, table["device"])


def _measured_shape(name: str):
    from trainers import models

    return {"smollm2_135m": models.SMOLLM2_135M, "llama2_7b": models.LLAMA2_7B,
            "llama2_13b": models.LLAMA2_13B}[name].llama_config()


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"
