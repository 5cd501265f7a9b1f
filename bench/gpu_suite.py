"""The GPU proof in one command: bf16 training tokens/s and MFU per attention path on packed 4,096-token rows
(full fine-tuning for SmolLM2-135M's shape, LoRA + new-token rows for LLaMA-2-7B and Llama-3.1-8B), peak memory
next to `recllm plan`, constrained beam search against HF generate, the multinomial head, and a DeepSpeed
ZeRO-2 step; random-init models, one process, no Ray. The work itself is in bench/gpu_suite_workloads.py.

    python bench/gpu_suite.py --device cuda --out runs/gpu_suite        # everything, within --budget seconds
    python bench/gpu_suite.py --device cuda --out runs/gpu_suite --cases 7b,deepspeed
    python bench/gpu_suite.py --device cpu --smoke --out /tmp/gpu_suite  # tiny shapes, seconds (in make test)
    bench/gpu_suite.sh run                                               # on a lent GPU, with the carried wheels
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import gpu_suite_workloads as work  # noqa: E402
from gpu_suite_report import markdown  # noqa: E402
from data_pipeline.item_ids.item_codes import semantic_vocabulary  # noqa: E402
from launcher.config import load_config  # noqa: E402
from trainers import models  # noqa: E402
from trainers.lora_adapters import apply_lora  # noqa: E402
from trainers.memory_plan import plan_memory  # noqa: E402

ATTENTIONS = ("sdpa", "flex_attention", "flash_attention_2")
"""Kernels on packed rows: SDPA with the block-diagonal mask, FlexAttention with a block mask, flash-attn varlen."""


@dataclass(frozen=True)
class ModelGroup:
    """The cases of one model: training with every attention path, then inference."""

    model: str
    finetune: str
    rows: int
    """Packed rows per step."""
    visibility: bool = False
    """Also train with ControlRec's visibility mask (SDPA 4D mask and FlexAttention block mask)."""
    beam: tuple[int, int, int] | None = None
    """(users for our search, users for HF generate, users checked for agreement); None: no inference cases."""


@dataclass(frozen=True)
class Profile:
    """Sizes of one run of the suite; the groups run in order, so the most wanted numbers come first."""

    groups: tuple[ModelGroup | str, ...]
    """Model groups, and "deepspeed" where the ZeRO-2 step runs."""
    seq_len: int
    warmup: int
    steps: int
    dtype: str
    levels: int = 4
    codes: int = 256
    items: int = 4000
    beams: int = 20
    top_k: int = 20
    users_per_batch: int = 128
    hf_users_per_batch: int = 16
    deepspeed: tuple[str, int] = ("smollm2_135m", 4)
    """(model, rows) of the DeepSpeed step (full fine-tuning)."""


FULL = Profile(groups=(ModelGroup("smollm2_135m", "full", 4, visibility=True, beam=(512, 64, 16)),
                       ModelGroup("llama2_7b", "lora", 1, visibility=True, beam=(256, 32, 8)),
                       "deepspeed",
                       ModelGroup("llama3_8b", "lora", 1)),
               seq_len=4096, warmup=2, steps=6, dtype="bfloat16")
SMOKE = Profile(groups=(ModelGroup("tiny", "full", 2, visibility=True, beam=(8, 8, 8)),
                        ModelGroup("tiny", "lora", 2), "deepspeed"),
                seq_len=256, warmup=1, steps=2, dtype="float32", codes=16, items=300, beams=6, top_k=5,
                users_per_batch=4, hf_users_per_batch=4, deepspeed=("tiny", 2))


@dataclass
class Case:
    name: str
    run: Callable[[], dict]


class Workspace:
    """One model on the device at a time (the next one is built only after the last is freed), the packed
    batches per shape, and the run config that `recllm plan` reads for each case."""

    def __init__(self, profile: Profile, device: str):
        self.profile, self.device = profile, device
        self.new_tokens = semantic_vocabulary(profile.levels, profile.codes)
        _, self.tokenizer = models.tiny(self.new_tokens)  # prompts for every shape; its code ids are remapped
        self.key, self.model, self.new_ids, self.failure = None, None, None, None
        self.batches: dict = {}

    def config(self, model: str, finetune: str, rows: int, checkpointing: bool):
        cuda = self.device.startswith("cuda")
        size = "llama2_7b" if model == "llama3_8b" else model  # 8B: plan_memory gets its shape explicitly
        overrides = [f"model.size={size}", f"model.dtype={self.profile.dtype}",
                     f"train.use_gpu={str(cuda).lower()}", "train.num_workers=1", "train.gpus_per_node=1",
                     f"train.micro_batch_size={rows}", f"train.seq_len={self.profile.seq_len}",
                     f"train.finetune={finetune}", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                     "train.deepspeed_config=configs/deepspeed/zero2.json"]
        if cuda:
            overrides.append(f"train.gpu_memory_gb={torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}")
        return load_config(str(work.REPO / "configs" / "demo.yaml"), overrides)

    def plan(self, cfg, model: str):
        return plan_memory(cfg, len(self.new_tokens), shape=work.LLAMA31_8B if model == "llama3_8b" else None)

    def get(self, model: str, finetune: str):
        """(model, new token ids), LoRA-wrapped for finetune=lora; a failed build fails every case that needs it.
        Inference ("plain") reuses a fully fine-tuned model as it is."""
        key = (model, finetune == "lora")
        if key != self.key:
            self.release()
            self.key = key
            try:
                self.model, self.new_ids = work.build(model, self.new_tokens, self.device, self.profile.dtype)
                if finetune == "lora":
                    t = self.config(model, finetune, 1, False).train
                    self.model = apply_lora(self.model, self.new_ids, t.lora_r, t.lora_alpha, t.lora_dropout,
                                            t.lora_target_modules)
            except Exception as exc:
                self.model = None
                self.failure = RuntimeError(f"building {model}: {type(exc).__name__}: {exc}")
        if self.failure is not None:
            raise self.failure
        return self.model, self.new_ids

    def packed(self, model: str, rows: int):
        """(batches, interaction graph) for the model that ``get`` built last."""
        if (model, rows) not in self.batches:
            vocab = self.model.config.vocab_size - len(self.new_tokens)
            self.batches[model, rows] = work.synthetic_batches(self.profile.warmup + self.profile.steps, rows,
                                                               self.profile.seq_len, self.new_ids, vocab,
                                                               self.profile.levels)
        return self.batches[model, rows]

    def release(self) -> None:
        self.model = self.new_ids = self.failure = None
        self.key = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ cases

def train_case(ws: Workspace, g: ModelGroup, attention: str, checkpointing: bool, visibility: bool = False) -> dict:
    model, _ = ws.get(g.model, g.finetune)
    if attention == "flex_attention" and not ws.device.startswith("cuda"):
        raise work.Unavailable("FlexAttention has no backward pass on the CPU")
    work.set_attention(model, attention)
    batches, graph = ws.packed(g.model, g.rows)
    row = {"kind": "train", "model": g.model, "finetune": g.finetune, "attention": attention,
           "visibility": visibility, "gradient_checkpointing": checkpointing, "rows": g.rows,
           "seq_len": ws.profile.seq_len}
    try:
        if visibility:
            dtype = next(model.parameters()).dtype
            row["mask_build_s"], row["masks_resident_gib"] = work.attach_visibility(batches, graph, attention,
                                                                                    ws.device, dtype)
        row.update(work.train_steps(model, batches, work.MaskedSFT(unpacked=attention == "sdpa-unpacked"),
                                    ws.device, ws.profile.warmup, g.finetune == "lora", checkpointing))
    finally:
        for batch in batches:
            batch.attention_mask = None
        work.set_attention(model, "sdpa")
    cfg = ws.config(g.model, g.finetune, g.rows, checkpointing)
    row.update(work.plan_row(ws.plan(cfg, g.model), row["peak_allocated_gib"]))
    return row


def beam_case(ws: Workspace, g: ModelGroup) -> dict:
    model, new_ids = ws.get(g.model, "plain")
    users, hf_users, agreement = g.beam
    p = ws.profile
    trie, token_ids, prompts = work.beam_workload(model, new_ids, ws.tokenizer, p.levels, p.codes, p.items, users)
    return {"kind": "beam", "model": g.model, **work.beam_search_rates(
        model, ws.tokenizer, trie, token_ids, prompts, p.beams, p.top_k, hf_users, agreement, p.users_per_batch,
        p.hf_users_per_batch)}


def multinomial_case(ws: Workspace, g: ModelGroup) -> dict:
    model, new_ids = ws.get(g.model, "plain")
    p = ws.profile
    _, _, prompts = work.beam_workload(model, new_ids, ws.tokenizer, p.levels, p.codes, p.items, g.beam[0])
    return {"kind": "multinomial", "model": g.model,
            **work.multinomial_rates(model, ws.tokenizer, prompts, new_ids, p.top_k, p.users_per_batch, ws.device)}


def deepspeed_case(ws: Workspace) -> dict:
    name, rows = ws.profile.deepspeed
    model, _ = ws.get(name, "full")
    batches, _ = ws.packed(name, rows)
    cfg = ws.config(name, "full", rows, False)
    ws.key = None  # DeepSpeed takes the model over; build afresh for anything after
    row = {"kind": "deepspeed", "model": name, "finetune": "full", "rows": rows, "seq_len": ws.profile.seq_len,
           **work.deepspeed_steps(model, batches, cfg.train, ws.device, ws.profile.warmup)}
    row.update(work.plan_row(ws.plan(cfg, name), row["peak_allocated_gib"]))
    ws.release()
    return row


def planned_cases(ws: Workspace) -> list[Case]:
    """Every case of the profile, in the order they run."""
    cases = []
    for g in ws.profile.groups:
        if g == "deepspeed":
            cases.append(Case(f"deepspeed zero2 {ws.profile.deepspeed[0]} full", lambda: deepspeed_case(ws)))
            continue
        for attention in ATTENTIONS:
            for ckpt in (False, True):
                cases.append(Case(f"train {g.model} {g.finetune} {attention} ckpt={'on' if ckpt else 'off'}",
                                  lambda g=g, a=attention, c=ckpt: train_case(ws, g, a, c)))
        cases.append(Case(f"train {g.model} {g.finetune} sdpa-unpacked ckpt=off",
                          lambda g=g: train_case(ws, g, "sdpa-unpacked", False)))
        if g.visibility:
            for attention in ("sdpa", "flex_attention"):
                cases.append(Case(f"train {g.model} {g.finetune} visibility-{attention} ckpt=off",
                                  lambda g=g, a=attention: train_case(ws, g, a, False, visibility=True)))
        if g.beam:
            cases.append(Case(f"beam {g.model}", lambda g=g: beam_case(ws, g)))
            cases.append(Case(f"multinomial {g.model}", lambda g=g: multinomial_case(ws, g)))
    return cases


# ------------------------------------------------------------------------------------------------ runner

def run(cases: list[Case], budget_s: float, started: float, write: Callable[[list[dict]], None]) -> list[dict]:
    """Run every case, each guarded: an exception (OOM, a missing kernel) becomes that case's row and the suite
    goes on; once ``budget_s`` has passed since ``started`` the rest are skipped. Results are written after
    every case, so a run killed from outside still leaves what it measured."""
    rows: list[dict] = []
    for case in cases:
        t0, cpu0 = time.monotonic(), time.process_time()
        if t0 - started > budget_s:
            rows.append({"case": case.name, "status": "skipped: time budget"})
        else:
            try:
                row = {"case": case.name, "status": "ok", **case.run()}
            except work.Unavailable as exc:
                row = {"case": case.name, "status": f"unavailable: {exc}"}
            except Exception as exc:  # the suite records a failing case and goes on
                row = {"case": case.name, "status": f"error: {type(exc).__name__}: {work.first_line(exc)}",
                       "traceback": traceback.format_exc()[-2000:]}  # a GPU loan is too short to rerun for it
            gc.collect()  # the failed case's frames (and the tensors they held) are gone with its exception
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row["seconds"] = round(time.monotonic() - t0, 2)
            row["cpu_seconds"] = round(time.process_time() - cpu0, 2)
            rows.append(row)
            print(f"[{time.monotonic() - started:6.0f}s] {case.name}: {row['status']}", flush=True)
        write(rows)
    return rows


def environment(device: str, profile_name: str, budget: float) -> dict:
    import peft
    import transformers

    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"CPU, torch threads: {torch.get_num_threads()}"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "profile": profile_name,
            "budget_s": budget, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: every non-CUDA path in seconds")
    parser.add_argument("--out", default="runs/gpu_suite", help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; cases not started by then are skipped")
    parser.add_argument("--cases", default="", help="comma-separated substrings: run only the cases naming one")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: 1 with --smoke, where tiny ops gain nothing from more; "
                             "else torch's default)")
    args = parser.parse_args(argv)
    started, threads = time.monotonic(), torch.get_num_threads()
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    try:
        return run_suite(args, started)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the smoke test) gets its setting back


def run_suite(args, started: float) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu --smoke)")
    profile = SMOKE if args.smoke else FULL
    torch.manual_seed(0)
    # FlexAttention is compiled once per model shape and mask function (packed, visibility): more than dynamo's
    # default of 8 recompiles in one run, after which it would fall back to the unfused (L x L) path.
    for name, limit in (("recompile_limit", 64), ("accumulated_recompile_limit", 1024)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)
    ws = Workspace(profile, args.device)
    cases = planned_cases(ws)
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(args.device, "smoke" if args.smoke else "full", args.budget)

    def write(rows: list[dict]) -> None:
        (out / "gpu_suite.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (out / "gpu_suite.md").write_text(markdown(meta, rows))

    rows = run(cases, args.budget, started, write)
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
