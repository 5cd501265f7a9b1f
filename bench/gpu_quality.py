"""Does a language prior help? The demo's sequence recipe on one GPU, with the pretrained SmolLM2-135M against
the same shape trained from scratch (and the demo's tiny model), next to SASRec and most-popular trained and
scored in the same run (issue #14, item 7).

The lent GPU image has no Ray or DeepSpeed, so this runs the training loop's parts in one process: the run
config (configs/demo.yaml + a variant's overrides), `build_model` with the run's new tokens (item rows from
their titles with model.new_token_init=text), the registered objective, the sample stream, tokeniser and
packer of `recllm train`, validation rounds with the scorer `recllm infer` uses (best round kept, patience),
then HR/NDCG on the test split with that scorer. The optimiser is torch AdamW on fp32 master weights under
bf16 autocast, which is what DeepSpeed's bf16 mode does with the project's AdamW.

Inputs are prepared run_dirs (prepare, build-ids, build-samples done on CPU), one per sample set:

    python bench/gpu_quality.py --runs seq=/tmp/gq/seq,text=/tmp/gq/text --variants tiny,smollm2 \
        --device cuda --out $OUT
    python bench/gpu_quality.py ... --device cpu --smoke          # a few steps each (tests/test_gpu_quality.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_pipeline import storage  # noqa: E402
from data_pipeline.run_layout import RunLayout  # noqa: E402
from data_pipeline.samples.prompt_format import pad_token_id  # noqa: E402
from data_pipeline.streaming_reader import ShardedParquetStream  # noqa: E402
from inference.evaluate import most_popular, recllm_metrics  # noqa: E402
from ranking.topk_scorer import TopKScorer  # noqa: E402
from launcher.config import load_config  # noqa: E402
from trainers.models import build_model, count_parameters  # noqa: E402
from trainers.packing import Packer  # noqa: E402
from trainers.ray_launch import training_inputs  # noqa: E402
from trainers.packed_lm import SAMPLE_COLUMNS, SampleFeed, tokenizing_transform  # noqa: E402
from trainers.recipes.registry import ObjectiveContext, objective_class  # noqa: E402
from trainers.validation import VALID_METRIC, ValidationRound  # noqa: E402

CONFIG = "configs/demo.yaml"
SMOLLM2_SHAPE = ["model.tiny.hidden_size=576", "model.tiny.num_layers=30", "model.tiny.num_heads=9",
                 "model.tiny.num_kv_heads=3", "model.tiny.intermediate_size=1536"]
"""SmolLM2-135M's shape (read from its GGUF) on the tiny model: the from-scratch control of the same size."""
VARIANTS = {  # name -> (sample set, overrides on configs/demo.yaml)
    "tiny": ("seq", []),
    "smollm2": ("seq", ["model.size=smollm2_135m", "model.new_token_init=text"]),
    "smollm2-scratch": ("seq", ["model.size=tiny", *SMOLLM2_SHAPE]),
    "smollm2-lr3e-4": ("seq", ["model.size=smollm2_135m", "model.new_token_init=text", "train.learning_rate=3e-4"]),
    "smollm2+text": ("text", ["model.size=smollm2_135m", "model.new_token_init=text"]),
    "smollm2-scratch+text": ("text", ["model.size=tiny", *SMOLLM2_SHAPE]),
}
KS = (10, 20)


def lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / (warmup + 1))


def train_variant(cfg, device: str, budget_s: float, log) -> tuple[torch.nn.Module, object, dict, dict]:
    """Train one variant with its config's objective; returns (model with the best round's weights, its
    tokenizer, the training inputs, a summary)."""
    tcfg = cfg.train
    inputs = training_inputs(cfg)
    run_dir = inputs["run_dir"]
    model, tokenizer = build_model(cfg.model, inputs["new_tokens"], token_texts=inputs["token_texts"],
                                   token_vectors=inputs["token_vectors"], device="cpu", seed=cfg.seed)
    if tcfg.finetune == "lora":  # as the worker does: adapters, plus the new token rows trained in full
        from trainers.lora_adapters import apply_lora

        new_ids = tokenizer.convert_tokens_to_ids(inputs["new_tokens"])
        model = apply_lora(model, new_ids, tcfg.lora_r, tcfg.lora_alpha, tcfg.lora_dropout,
                           tcfg.lora_target_modules)
    model.to(device)
    objective = objective_class(tcfg.objective).build(ObjectiveContext(
        tcfg, inputs["tasks"], tokenizer, inputs["new_tokens"], run_dir, cfg.seed, 0,
        getattr(model.config, "_attn_implementation", "sdpa")))
    stream = ShardedParquetStream(RunLayout(run_dir).samples_split("train"), 0, 1, batch_size=64, seed=cfg.seed,
                                  columns=SAMPLE_COLUMNS,
                                  transform=tokenizing_transform(tokenizer, inputs["tasks"], tcfg.seq_len),
                                  use_ray=False)
    feed = SampleFeed(stream, Packer(tcfg.seq_len, tcfg.micro_batch_size, pad_token_id(tokenizer),
                                     tcfg.packing_lookahead, tcfg.packing))
    fused = device.startswith("cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, fused=fused)
    validation = ValidationRound(cfg.infer.scorer_settings(), cfg.train.eval_users, cfg.seed, run_dir, tokenizer,
                                 inputs["prompt_format"], 0, 1, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if fused else torch.autocast("cpu", enabled=False)
    best = {"step": 0, VALID_METRIC: -1.0}
    best_state, rounds, bad, stopped = None, [], 0, "max_steps"
    t0 = time.perf_counter()
    step, tokens, loss_sum = 0, 0, 0.0
    model.train()
    while step < tcfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = tcfg.learning_rate * lr_factor(step, tcfg.warmup_steps)
        batch = feed.next_batch()
        with autocast:
            loss, _, _ = objective.loss(model, batch, step, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.real_tokens
        loss_sum += loss.item()
        out_of_time = time.perf_counter() - t0 > budget_s
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps or out_of_time:
            with autocast:
                scores = validation.score(model)
            rounds.append({"step": step, "loss": loss_sum / tcfg.eval_every, "epoch": stream.epoch, **scores,
                           "seconds": round(time.perf_counter() - t0, 1)})
            loss_sum = 0.0
            log(f"  step {step} epoch {stream.epoch} loss {rounds[-1]['loss']:.4f} "
                f"valid HR@10 {scores['valid/HR@10']:.4f} NDCG@10 {scores[VALID_METRIC]:.4f}")
            if scores[VALID_METRIC] > best[VALID_METRIC]:
                best = {"step": step, **scores}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                bad = 0
            else:
                bad += 1
            if tcfg.patience and bad >= tcfg.patience:
                stopped = "patience"
                break
            if out_of_time:
                stopped = "budget"
                break
    seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    summary = {"parameters": count_parameters(model), "trainable": sum(p.numel() for p in trainable), "steps": step, "best": best, "rounds": rounds,
               "train_seconds": round(seconds, 1), "tokens_per_s": round(tokens / max(seconds, 1e-9)),
               "stopped": stopped}
    return model, tokenizer, inputs, summary


def test_rows(run_dir: str, limit: int = 0):
    """(users, histories, targets) of the test split; the first ``limit`` users only when set (smoke runs)."""
    test = RunLayout(run_dir).read_sequences("test").sort_by("user_id")
    if limit:
        test = test.slice(0, limit)
    return test.column("user_id").to_numpy(), test.column("history").to_pylist(), test.column("target").to_numpy()


@torch.no_grad()
def score_test(cfg, model, tokenizer, prompt_format, device: str, limit: int = 0) -> dict:
    run_dir = storage.absolute(cfg.run_dir)
    counts = RunLayout(run_dir).read_manifest()["counts"]
    users, histories, targets = test_rows(run_dir, limit)
    settings = cfg.infer.scorer_settings(top_k=max(KS), num_beams=max(cfg.infer.num_beams, max(KS)))
    scorer = TopKScorer(run_dir, model, tokenizer, prompt_format, settings, counts["items"], counts["users"], device)
    t0 = time.perf_counter()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    with autocast:
        items, _ = scorer.score(users, histories)
    seconds = time.perf_counter() - t0
    metrics = recllm_metrics(items, targets, counts["items"], list(KS))
    metrics["users_per_s"] = round(len(users) / max(seconds, 1e-9), 1)
    return metrics


def baselines(run_dir: str, cfg, device: str, smoke: bool) -> dict:
    """SASRec (the baseline stage's config, trained here on the same device) and most-popular, on test."""
    from trainers.baseline import train_sasrec
    from trainers.sasrec import recommend_topk

    layout = RunLayout(run_dir)
    dataset, counts = layout.dataset, layout.read_manifest()["counts"]
    _, histories, targets = test_rows(run_dir, 64 if smoke else 0)
    popular = most_popular(layout.read_sequences("train"), max(KS))
    out = {"popular": recllm_metrics(np.tile(popular, (len(targets), 1)), targets, counts["items"], list(KS))}
    scfg = dataclasses.replace(cfg.baseline, device=device, **({"epochs": 1} if smoke else {}))
    t0 = time.perf_counter()
    result = train_sasrec(dataset, scfg, seed=cfg.seed)
    items, _ = recommend_topk(result.model, histories, max(KS), exclude_seen=cfg.infer.exclude_seen)
    out["sasrec"] = recllm_metrics(items.numpy(), targets, counts["items"], list(KS))
    out["sasrec"]["train_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(device_name: str, seed: int, rows: dict, base: dict) -> str:
    cols = [f"HR@{k}" for k in KS] + [f"NDCG@{k}" for k in KS]
    lines = [f"GPU quality ({device_name}), Scientific, seed {seed}; best valid round kept (valid/NDCG@10 on "
             f"a fixed sample of valid users), test scored once at the end.", "",
             "| model | params | steps (best) | train s | valid NDCG@10 | " + " | ".join(cols)
             + " | vs SASRec HR@10, NDCG@10 |", "|---" * (len(cols) + 6) + "|"]
    sas = base.get("sasrec", {})
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |")
            continue
        m, t = row["test"], row["train"]
        ratio = (f"{m['HR@10'] / sas['HR@10']:.2f}x, {m['NDCG@10'] / sas['NDCG@10']:.2f}x" if sas else "")
        lines.append(f"| {name} | {t['parameters'] / 1e6:.1f}M | {t['steps']} ({t['best']['step']}) | "
                     f"{t['train_seconds']} | {t['best'][VALID_METRIC]:.4f} | "
                     + " | ".join(f"{m[c]:.4f}" for c in cols) + f" | {ratio} |")
    for name in ("sasrec", "popular"):
        if name in base:
            lines.append(f"| {name} | | | {base[name].get('train_seconds', '')} | | "
                         + " | ".join(f"{base[name][c]:.4f}" for c in cols) + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="sample set -> prepared run_dir, e.g. seq=/a,text=/b")
    parser.add_argument("--variants", default="tiny,smollm2,smollm2-scratch", help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/gpu_quality")
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per variant")
    parser.add_argument("--smoke", action="store_true", help="a few steps per variant (CPU test)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = parser.parse_args(argv)
    runs = dict(part.split("=", 1) for part in args.runs.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "gpu_quality.log", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    smoke = ["train.max_steps=4", "train.eval_every=2", "train.eval_users=16"] if args.smoke else []
    results: dict = {"device": device_name, "variants": {}}
    first = next(iter(runs.values()))
    base_cfg = load_config(CONFIG, [f"run_dir={first}", *args.overrides, *smoke])
    t0 = time.perf_counter()
    results["baselines"] = baselines(first, base_cfg, args.device, args.smoke)
    log(f"baselines in {time.perf_counter() - t0:.0f}s: " + json.dumps(
        {k: {m: round(v[m], 4) for m in ("HR@10", "NDCG@10")} for k, v in results["baselines"].items()}))
    for name in args.variants.split(","):
        sample_set, overrides = VARIANTS[name]
        cfg = load_config(CONFIG, [f"run_dir={runs[sample_set]}", *overrides, *args.overrides, *smoke])
        log(f"{name}: {' '.join(overrides + args.overrides) or 'configs/demo.yaml as is'}")
        try:
            model, tokenizer, inputs, summary = train_variant(cfg, args.device, args.budget, log)
            test = score_test(cfg, model, tokenizer, inputs["prompt_format"], args.device, 64 if args.smoke else 0)
            results["variants"][name] = {"overrides": overrides, "train": summary, "test": test}
            log(f"  test HR@10 {test['HR@10']:.4f} NDCG@10 {test['NDCG@10']:.4f} (best step "
                f"{summary['best']['step']}, {summary['train_seconds']}s, {summary['tokens_per_s']} tokens/s)")
            del model
        except Exception as exc:  # one variant's failure must not lose the others' rows
            traceback.print_exc()
            results["variants"][name] = {"overrides": overrides, "error": str(exc).splitlines()[0][:200]}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        (out / "gpu_quality.json").write_text(json.dumps(results, indent=1, default=float))
        (out / "gpu_quality.md").write_text(markdown(device_name, base_cfg.seed, results["variants"],
                                                     results["baselines"]))
    print((out / "gpu_quality.md").read_text())
    return 0 if all("error" not in v for v in results["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
