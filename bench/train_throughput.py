"""SFT throughput: recllm's trainer (Ray Train + DeepSpeed ZeRO-2, packed rows) vs a plain Hugging Face
`Trainer` (one sample per row, padded per batch) on the same tiny LLaMA and the same samples, in one run.

Both count useful tokens (prompt + response, no padding) per second of training. Prints both, the ratio
(goal >= 1.3x, from packing) and our packing efficiency (goal >= 97%).
Usage: python bench/train_throughput.py [--steps 60] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


def prepare_run(run_dir: Path, overrides: list[str]) -> None:
    from launcher.cli import main

    for stage in ("prepare", "build-ids", "build-samples"):
        if main([stage, str(REPO / "configs" / "alignment_sft.yaml"), f"run_dir={run_dir}", *overrides]) != 0:
            raise SystemExit(f"{stage} failed")


def ours(run_dir: Path, overrides: list[str]) -> dict:
    from data_pipeline.run_layout import RunLayout
    from launcher.config import load_config
    from trainers.ray_launch import run_training

    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), [f"run_dir={run_dir}", *overrides])
    run_training(cfg)
    rows = [json.loads(line) for line in Path(RunLayout(str(run_dir)).train_metrics).read_text().splitlines()]
    steady = rows[1:]  # the first window includes start-up (Ray Data, DeepSpeed init)
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "packing_efficiency": sum(r["packing_efficiency"] for r in steady) / len(steady)}


def hf_trainer(run_dir: Path, overrides: list[str], tokens_per_step: float, steps: int) -> dict:
    import pyarrow.parquet as pq
    import torch
    from transformers import Trainer, TrainingArguments

    from data_pipeline.run_layout import RunLayout
    from launcher.config import load_config
    from trainers.models import build_model
    from trainers.packing import IGNORE, tokenize_sample

    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), [f"run_dir={run_dir}", *overrides])
    layout = RunLayout(str(run_dir))
    new_tokens = layout.read_new_tokens()
    model, tokenizer = build_model(cfg.model, new_tokens, seed=cfg.seed)
    table = pq.read_table(layout.samples_split("train"), columns=["prompt", "response"])
    probe = [tokenize_sample(tokenizer, p, r, cfg.train.seq_len)
             for p, r in zip(table.column("prompt").to_pylist()[:500], table.column("response").to_pylist()[:500])]
    mean_len = sum(len(ids) for ids, _ in probe) / len(probe)
    samples_per_batch = max(1, round(tokens_per_step / mean_len))  # the same useful tokens per step as ours
    n = samples_per_batch * steps
    rows = [tokenize_sample(tokenizer, p, r, cfg.train.seq_len)
            for p, r in zip(table.column("prompt").to_pylist()[:n], table.column("response").to_pylist()[:n])]
    from data_pipeline.samples.prompt_format import pad_token_id

    pad = pad_token_id(tokenizer)

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids, n_prompt = rows[i]
            return {"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]}

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), IGNORE)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(output_dir=str(run_dir / "hf_trainer"), per_device_train_batch_size=samples_per_batch,
                             max_steps=steps, learning_rate=cfg.train.learning_rate, logging_steps=10**9,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=cfg.seed)
    trainer = Trainer(model=model, args=args, train_dataset=Samples(), data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    useful = sum(len(r[0]) for r in rows)
    return {"tokens_per_s": useful / seconds, "seconds": seconds, "samples_per_batch": samples_per_batch,
            "mean_len": mean_len}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per worker per step")
    args = ap.parse_args()
    common = ["ids.scheme=precomputed", "samples.max_samples_per_task=4000", f"train.seq_len={args.seq_len}"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        prepare_run(run_dir, common)
        train = [*common, f"train.max_steps={args.steps}", f"train.micro_batch_size={args.rows}",
                 "train.log_every=10", "train.checkpoint_every=0", "train.record_samples=false"]
        ours_result = ours(run_dir, train)
        # Same model, same samples, same useful tokens per optimizer step: 2 workers x rows x seq_len packed.
        tokens_per_step = 2 * args.rows * args.seq_len * ours_result["packing_efficiency"]
        hf = hf_trainer(run_dir, train, tokens_per_step, max(10, args.steps // 2))
    ratio = ours_result["tokens_per_s"] / hf["tokens_per_s"]
    print(f"recllm trainer (Ray Train + DeepSpeed ZeRO-2, 2 workers, packed): {ours_result['tokens_per_s']:9.0f} tokens/s")
    print(f"HF Trainer (1 process, padded batches of {hf['samples_per_batch']} samples of mean "
          f"{hf['mean_len']:.0f} tokens): {hf['tokens_per_s']:9.0f} tokens/s")
    print(f"ratio: {ratio:.2f}x (goal >= 1.3x); packing efficiency {ours_result['packing_efficiency']:.1%} (goal >= 97%)")


if __name__ == "__main__":
    main()
