"""Markdown of the GPU suite's rows (bench/gpu_suite.py), ready to paste into bench/RESULTS.md: a training table
(tokens/s, MFU, peak memory next to `recllm plan`) and an inference table (beam search vs HF generate, the
multinomial head), each headed by the device and the versions it ran with.
"""

from __future__ import annotations


def _num(value, fmt: str = "{:,.0f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def training_table(rows: list[dict]) -> list[str]:
    lines = ["| case | tokens/s | MFU | model FLOPs/token | peak allocated GiB | plan live GiB | measured / plan "
             "| status |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if not r["case"].startswith(("train", "deepspeed")):
            continue
        lines.append(f"| {r['case']} | {_num(r.get('tokens_per_s'))} | {_pct(r.get('mfu'))} "
                     f"| {_num(r.get('model_flops_per_token'), '{:.3g}')} "
                     f"| {_num(r.get('peak_allocated_gib'), '{:.2f}')} "
                     f"| {_num(r.get('plan_live_gib'), '{:.2f}')} | {_num(r.get('measured_over_plan'), '{:.2f}')} "
                     f"| {r['status']} |")
    return lines


def inference_table(rows: list[dict]) -> list[str]:
    lines = ["| case | ours users/s | HF generate users/s | speedup | identical top-K sets | status |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["case"].startswith("beam"):
            agree = (f"{_pct(r['agreement_identical_sets'])} of {r['agreement_users']}"
                     if r.get("agreement_users") else "n/a")
            lines.append(f"| {r['case']} | {_num(r.get('ours_users_per_s'), '{:,.1f}')} "
                         f"| {_num(r.get('hf_users_per_s'), '{:,.1f}')} | {_num(r.get('speedup'), '{:.1f}x')} "
                         f"| {agree} | {r['status']} |")
        elif r["case"].startswith("multinomial"):
            lines.append(f"| {r['case']} | {_num(r.get('users_per_s'), '{:,.1f}')} | | | | {r['status']} |")
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    train = [r for r in rows if r["case"].startswith("train") and r["status"] == "ok"]
    shape = f"{train[0]['rows']} x {train[0]['seq_len']:,}-token packed rows" if train else "packed rows"
    head = [f"### GPU suite on {meta['device']} ({meta['date']}; torch {meta['torch']}, CUDA {meta['cuda']}, "
            f"transformers {meta['transformers']}, peft {meta['peft']}; profile {meta['profile']})", "",
            f"Training on {shape} (rows per step in each JSON row). MFU = tokens/s x (6 N + 12 x layers x q_dim x "
            "mean context) / peak bf16 FLOP/s, N = weights of every projection and the head, context = keys each "
            "token sees in its packed sample; LoRA and checkpointing count the same model FLOPs (the executed count "
            "is in the JSON). Measured peak = torch.cuda.max_memory_allocated, set against the plan's live bytes "
            "(before its CUDA context and 10% slack).", ""]
    return "\n".join(head + training_table(rows) + [""] + inference_table(rows)) + "\n"
