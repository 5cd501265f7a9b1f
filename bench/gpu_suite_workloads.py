"""What the GPU suite (bench/gpu_suite.py) measures, one function per kind of case: random-init models of the
real shapes from ``trainers.models``, synthetic packed rows from ``trainers.packing``, a training step through
``SFTObjective``, beam search through ``inference`` and ``bench/beam_search.py``, and one DeepSpeed step
through ``trainers.deepspeed_engine``. Each returns the numbers of one result row; Ray is never imported.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.item_ids.item_codes import semantic_token, semantic_vocabulary
from ranking.code_trie import CodeTrie
from ranking.constrained_beam_search import constrained_beam_search, encode_prompts
from ranking.multinomial_head import multinomial_topk
from trainers import models
from trainers.flop_count import mean_context, peak_bf16_flops, training_flops_per_token
from trainers.packing import Packer, PackedBatch, TokenizedSample
from trainers.recipes.objectives import SFTObjective
from trainers.recipes.visibility import InteractionGraph, item_key, visibility_mask, visibility_mask_mod

import beam_search as beam_bench  # bench/beam_search.py: HF generate, prompts, FLOPs per user, agreement

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3

LLAMA31_8B = models.LLAMA31_8B


class Unavailable(RuntimeError):
    """The machine lacks what a case needs (a kernel, a package, CUDA); recorded as such, not as a failure."""


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]


# ------------------------------------------------------------------------------------------------ models

def build(name: str, new_tokens: list[str], device: str, dtype: str):
    """(model, ids of ``new_tokens``) at random init, built on ``device``. SmolLM2-135M's builder reads
    pretrained weights that cannot travel to a lent GPU (a 98 MB GGUF), so its shape is drawn at random."""
    if name == "tiny":
        model, tokenizer = models.tiny(new_tokens, dtype=dtype, device=device, attn_implementation="sdpa",
                                       new_token_noise=1.0)
        return model, tokenizer.convert_tokens_to_ids(new_tokens)
    if name == "llama2_7b":
        model, _ = models.llama2_7b(new_tokens, dtype=dtype, device=device, attn_implementation="sdpa",
                                    new_token_noise=1.0)
    else:
        shape = {"smollm2_135m": models.SMOLLM2_135M, "llama3_8b": LLAMA31_8B}[name]
        model = models.random_llama(shape, new_tokens, dtype=dtype, device=device, attn_implementation="sdpa",
                                    new_token_noise=1.0)
    base = model.config.vocab_size - len(new_tokens)
    return model, list(range(base, base + len(new_tokens)))


def set_attention(model, attention: str) -> None:
    """Switch the attention kernel in place ("sdpa-unpacked" runs sdpa: the objective drops the packing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "sdpa" if attention == "sdpa-unpacked" else attention
    try:
        base.set_attn_implementation(name)
    except (ImportError, ValueError) as exc:
        raise Unavailable(f"{name}: {first_line(exc)}") from None


# ------------------------------------------------------------------------------------------ packed rows

def synthetic_batches(count: int, rows: int, seq_len: int, new_ids: list[int], base_vocab: int, levels: int,
                      seed: int = 0) -> tuple[list[PackedBatch], InteractionGraph]:
    """``count`` packed batches of sequential-recommendation samples: BOS, text, a history of 5-9 items written
    as their code tokens, two unrelated items (another user's), up to 300 tokens of description text, then the
    next item's code and EOS as the response; every code token carries its item's entity key. The graph
    relates the items of each user's history (ControlRec's visibility matrix)."""
    rng = np.random.default_rng(seed)
    n_items, n_users, codes = 2000, 256, len(new_ids) // levels
    item_codes = [[new_ids[level * codes + int(rng.integers(codes))] for level in range(levels)]
                  for _ in range(n_items)]
    histories = [rng.choice(n_items, 12, replace=False).tolist() for _ in range(n_users)]
    graph = InteractionGraph(histories, list(range(n_users)))

    def text(n: int) -> list[int]:
        return rng.integers(3, base_vocab, n).tolist()

    def sample(sample_id: int) -> TokenizedSample:
        user = int(rng.integers(n_users))
        k = int(rng.integers(5, 10))
        mentioned = histories[user][:k] + rng.choice(n_items, 2).tolist()
        ids = [1] + text(int(rng.integers(5, 15)))
        ents = [0] * len(ids)
        for item in mentioned:
            ids += item_codes[item] + text(1)
            ents += [item_key(item)] * levels + [0]
        tail = text(int(rng.integers(0, min(300, seq_len // 4))) if rng.random() < 0.5 else 3)
        ids, ents = ids + tail, ents + [0] * len(tail)
        target = histories[user][k]
        return TokenizedSample(sample_id, 0, ids + item_codes[target] + [2], len(ids),
                               ents + [item_key(target)] * levels + [0])

    packer, batches, next_id = Packer(seq_len, rows, pad_id=0), [], 0
    while len(batches) < count:
        need = packer.need()
        packer.add(sample(next_id + i) for i in range(need))
        next_id += need
        batches.append(packer.build())
    return batches, graph


class MaskedSFT(SFTObjective):
    """SFTObjective with the attention mask each batch carries (the visibility matrix as a 4D tensor or a
    FlexAttention BlockMask), or with positions 0..L-1 (one causal sequence per row: the unpacked reference)."""

    def __init__(self, unpacked: bool = False):
        super().__init__(num_tasks=1)
        self.unpacked = unpacked

    def lm_forward(self, model, batch, device):
        if self.unpacked:
            positions = torch.arange(batch.input_ids.shape[1], device=device).expand(batch.input_ids.shape[0], -1)
            return model(input_ids=batch.input_ids.to(device), position_ids=positions, use_cache=False)
        return model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                     attention_mask=getattr(batch, "attention_mask", None), use_cache=False)


def attach_visibility(batches: list[PackedBatch], graph: InteractionGraph, attention: str, device: str,
                      dtype: torch.dtype) -> tuple[float, float]:
    """Give every batch its visibility mask for ``attention`` (sdpa: additive [B, 1, L, L]; flex_attention: a
    BlockMask from ``visibility_mask_mod``), on the device before the timed steps: (seconds spent building them,
    GiB they hold, which the measured peak includes and a trainer building one per step would not)."""
    t0 = time.perf_counter()
    for batch in batches:
        pos, ent = batch.position_ids.to(device), batch.entity_ids.to(device)
        if attention == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            b, length = pos.shape
            mask_mod = visibility_mask_mod(pos, ent, graph, table_size=length + 1)
            batch.attention_mask = create_block_mask(mask_mod, b, None, length, length, device=device)
        else:
            batch.attention_mask = visibility_mask(pos, ent, graph, dtype)
    dense = sum(b.attention_mask.numel() * b.attention_mask.element_size() for b in batches
                if isinstance(b.attention_mask, torch.Tensor))
    return time.perf_counter() - t0, dense / GIB


# ------------------------------------------------------------------------------------------------ training

class MasterWeightAdamW:
    """AdamW on fp32 copies of the 16-bit trainable weights, the layout of DeepSpeed's bf16 mode (16-bit
    weights and gradients, fp32 master + m + v: 12 bytes per trainable parameter), so that the measured peak
    compares with `recllm plan`'s model of it."""

    def __init__(self, params, lr: float):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().clone()) for p in params]
        self.optimizer = torch.optim.AdamW([master for _, master in self.pairs], lr=lr)

    def step(self) -> None:
        for p, master in self.pairs:
            if master is not p and p.grad is not None:
                master.grad, p.grad = p.grad.float(), None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, master in self.pairs:
                if master is not p:
                    p.copy_(master)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def set_checkpointing(model, on: bool, lora: bool) -> None:
    """As ``packed_lm.build_language_model`` does it: HF gradient checkpointing, plus input grads under LoRA
    (frozen embedding)."""
    if on:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
        if lora:
            model.disable_input_require_grads()


def train_steps(model, batches: list[PackedBatch], objective, device: str, warmup: int, lora: bool,
                gradient_checkpointing: bool) -> dict:
    """Train on ``batches`` (the first ``warmup`` untimed); tokens/s, MFU and peak memory of the rest."""
    set_checkpointing(model, gradient_checkpointing, lora)
    model.train()
    optimizer = MasterWeightAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    _reset_peak(device)
    losses, t0 = [], time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            loss, _, _ = objective.loss(model, batch, i, device)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        _sync(device)
        seconds = time.perf_counter() - t0
        memory = peak_memory(device)
    finally:  # after an OOM mid-step too: no gradient or optimizer state survives into the next case
        del optimizer
        for p in model.parameters():
            p.grad = None
        set_checkpointing(model, False, lora)
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    return {**step_rates(model.config, batches[warmup:], seconds, device, lora, gradient_checkpointing),
            **memory, "loss_first": losses[0], "loss_last": losses[-1]}


def step_rates(config, timed: list[PackedBatch], seconds: float, device: str, lora: bool, recompute: bool) -> dict:
    """tokens/s (every position of the rows) and MFU with the FLOP count it rests on."""
    tokens = sum(b.input_ids.numel() for b in timed)
    context = float(np.mean([mean_context(b.position_ids) for b in timed]))
    model_flops = training_flops_per_token(config, context)
    executed = training_flops_per_token(config, context, frozen_weights=lora, recompute=recompute)
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if device.startswith("cuda") else 0.0
    rate = tokens / seconds
    return {"steps": len(timed), "tokens_per_s": rate,
            "real_tokens_per_s": sum(b.real_tokens for b in timed) / seconds,
            "packing_efficiency": sum(b.real_tokens for b in timed) / tokens, "mean_context": context,
            "model_flops_per_token": model_flops, "executed_flops_per_token": executed,
            "mfu": rate * model_flops / peak if peak else None,
            "executed_flop_utilisation": rate * executed / peak if peak else None}


def plan_row(plan, measured_gib: float | None) -> dict:
    """`recllm plan`'s numbers next to the measured peak. Measured is what the allocator handed out, so it is
    compared with the plan's live bytes (weights + gradients + optimizer + activations + logits), before the
    plan adds the CUDA context and 10% slack."""
    live = (plan.weights + plan.gradients + plan.optimizer + plan.activations + plan.logits) / GIB
    return {"plan_live_gib": live, "plan_total_gib": plan.total / GIB, "plan_weights_gib": plan.weights / GIB,
            "plan_optimizer_gib": plan.optimizer / GIB, "plan_activations_gib": plan.activations / GIB,
            "plan_logits_gib": plan.logits / GIB, "trainable_params": plan.trainable_params,
            "measured_over_plan": measured_gib / live if measured_gib is not None else None}


# ------------------------------------------------------------------------------------------------ inference

def beam_workload(model, new_ids: list[int], tokenizer, levels: int, codes: int, items: int, users: int,
                  seed: int = 0):
    """(trie, code token ids per item, prompt ids per user) in the model's ids: bench/beam_search.py's random
    codes and prompts, tokenised by the tiny tokenizer and its code tokens mapped onto the model's new rows."""
    generator = torch.Generator().manual_seed(seed)
    item_codes = beam_bench.random_codes(items, levels, codes, generator)
    ours = dict(zip(tokenizer.convert_tokens_to_ids(semantic_vocabulary(levels, codes)), new_ids))
    token_ids = [[new_ids[level * codes + int(c)] for level, c in enumerate(row)] for row in item_codes]
    trie = CodeTrie(token_ids, vocab_size=model.config.vocab_size, dense_mask_limit=0)
    prompts = encode_prompts(tokenizer, beam_bench.synthetic_prompts(users, item_codes, generator))
    return trie, token_ids, [[ours.get(t, t) for t in p] for p in prompts]


def beam_search_rates(model, tokenizer, trie, token_ids, prompt_ids, beams: int, top_k: int, hf_users: int,
                      agreement_users: int, users_per_batch: int, hf_users_per_batch: int) -> dict:
    """users/s of our search and of HF generate (on the first ``hf_users``), and top-K agreement on the first
    ``agreement_users``."""
    model.eval()
    constrained_beam_search(model, prompt_ids[:4], trie, beams, top_k)  # warm-up
    beam_bench.hf_beam_search(model, tokenizer, prompt_ids[:2], trie, beams, top_k, 2)
    timed = beam_bench.best_seconds({
        "ours": lambda: constrained_beam_search(model, prompt_ids, trie, beams, top_k, users_per_batch=users_per_batch),
        "hf": lambda: beam_bench.hf_beam_search(model, tokenizer, prompt_ids[:hf_users], trie, beams, top_k,
                                                hf_users_per_batch)}, repeats=1)
    (ours, scores), ours_s, _ = timed["ours"]
    theirs, hf_s, _ = timed["hf"]
    n = agreement_users
    agreement = beam_bench.report_agreement(model, prompt_ids[:n], trie, token_ids, ours[:n], scores[:n], theirs[:n],
                                            beams)
    lengths = [len(p) for p in prompt_ids]
    flops = beam_bench.matmul_flops_per_user(model.config, float(np.mean(lengths)), trie.depth, beams)
    ours_rate, hf_rate = len(prompt_ids) / ours_s, hf_users / hf_s
    return {"users": len(prompt_ids), "hf_users": hf_users, "prompt_tokens_mean": float(np.mean(lengths)),
            "beams": beams, "top_k": top_k, "ours_users_per_s": ours_rate, "hf_users_per_s": hf_rate,
            "speedup": ours_rate / hf_rate, "ours_flops_per_user": flops["ours"], "hf_flops_per_user": flops["hf"],
            "agreement_identical_sets": agreement["identical_sets"],
            "agreement_identical_lists": agreement["identical_lists"], "agreement_users": agreement["users"],
            "agreement_differing_by_ties": agreement["differing_by_ties"],
            "agreement_max_score_error": agreement["max_score_error"]}


def multinomial_rates(model, tokenizer, prompt_ids, item_token_ids: list[int], top_k: int, users_per_batch: int,
                      device: str) -> dict:
    """users/s of CLLM4Rec's multinomial head (one forward pass per user, softmax over the item tokens)."""
    model.eval()
    tokenizer.padding_side = "left"
    items = torch.tensor(item_token_ids, device=device)

    def run():
        out = []
        for start in range(0, len(prompt_ids), users_per_batch):
            batch = tokenizer.pad({"input_ids": prompt_ids[start:start + users_per_batch]}, return_tensors="pt")
            idx, _ = multinomial_topk(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      items, top_k)
            out.append(idx.cpu())
        return torch.cat(out)

    run()  # warm-up
    t0 = time.perf_counter()
    top = run()
    seconds = time.perf_counter() - t0
    if top.shape != (len(prompt_ids), min(top_k, len(item_token_ids))):
        raise AssertionError(f"multinomial head returned {tuple(top.shape)}")
    return {"users": len(prompt_ids), "items": len(item_token_ids), "top_k": top_k,
            "users_per_s": len(prompt_ids) / seconds}


# ------------------------------------------------------------------------------------------------ deepspeed

def deepspeed_steps(model, batches, tcfg, device: str, warmup: int) -> dict:
    """One-process ZeRO stage of ``tcfg.deepspeed_config`` through the trainer's own ``wrap_model``."""
    from trainers import deepspeed_engine as dse

    dse.configure_cpu_accelerator()
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # missing, or a build that does not import: say which
        raise Unavailable(f"deepspeed does not import ({type(exc).__name__}: {exc})") from None
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
    try:
        ds_config = dse.deepspeed_config(tcfg, str(REPO / tcfg.deepspeed_config), bf16=device.startswith("cuda"))
        engine, _, _ = dse.wrap_model(model, dse.OptimizerSettings.of(tcfg), ds_config)
        objective = SFTObjective(num_tasks=1)
        engine.train()
        _reset_peak(device)
        t0, losses = time.perf_counter(), []
        for i, batch in enumerate(batches):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            loss, _, _ = objective.loss(engine, batch, i, device)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        _sync(device)
        seconds = time.perf_counter() - t0
        memory = peak_memory(device)
        del engine
    finally:
        dist.destroy_process_group()
    return {"zero_stage": dse.zero_stage(ds_config), **step_rates(model.config, batches[warmup:], seconds, device,
                                                                  False, False),
            **memory, "loss_first": losses[0], "loss_last": losses[-1]}
