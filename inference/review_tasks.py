"""`recllm evaluate-reviews`: greedy decoding of the exported model (run_dir/model, from `recllm train`) on the
review-task test samples (build-review-samples), scored per task: rating -> MSE/RMSE (a reply with no digit
1-5 counts as the train mean and is reported), explanation and review_summary -> ROUGE-L F1 (rouge-score) and
corpus BLEU (sacrebleu), direct_recommendation -> hit rate of the first generated item token, and of the candidate ranked highest
by a softmax restricted to the prompt's candidates.
Writes run_dir/report/review_tasks/{report.json, report.md, scores.png}.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.errors import DataError
from data_pipeline.run_layout import RunLayout
from data_pipeline.samples.prompt_format import PromptFormat, pad_token_id

log = logging.getLogger("recllm.review_tasks")

ITEM_TOKEN = re.compile(r"<item_(\d+)>")


def parse_rating(text: str) -> float | None:
    """The first digit 1-5 in a reply, as a rating; None when there is none."""
    m = re.search(r"[1-5]", text)
    return float(m.group()) if m else None


def rating_scores(replies: list[str], truth: list[float], fallback: float) -> dict:
    parsed = [parse_rating(r) for r in replies]
    pred = np.array([p if p is not None else fallback for p in parsed])
    mse = float(np.mean((pred - np.asarray(truth)) ** 2))
    fallback_mse = float(np.mean((fallback - np.asarray(truth)) ** 2))
    return {"mse": mse, "rmse": math.sqrt(mse), "unparsed": sum(p is None for p in parsed),
            "train_mean_mse": fallback_mse}


def text_scores(replies: list[str], references: list[str]) -> dict:
    """ROUGE-L F1 (mean over samples, stemmed) and corpus BLEU (sacrebleu, 13a tokenizer), both 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, replies)]
    bleu = sacrebleu.corpus_bleu(replies, [references])
    return {"rougeL": 100 * float(np.mean(rouge)), "bleu": float(bleu.score)}


def candidate_tokens(prompt: str) -> list[str]:
    """The item tokens after the prompt's candidate marker ("from:" or "Candidates:"), in order."""
    for marker in ("Candidates:", "from:"):
        if marker in prompt:
            return ITEM_TOKEN.findall(prompt.split(marker, 1)[1].split("Given")[0])
    return []


def pick_scores(replies: list[str], targets: list[str], prompts: list[str]) -> dict:
    """Hit rate: the first item token of the reply is the target; valid: it is one of the prompt's candidates."""
    hits, valid = 0, 0
    for reply, target, prompt in zip(replies, targets, prompts):
        m = ITEM_TOKEN.search(reply)
        if m is None:
            continue
        valid += m.group() in [f"<item_{i}>" for i in candidate_tokens(prompt)]
        hits += m.group() == target
    n = max(len(replies), 1)
    return {"hit_rate": hits / n, "valid_pick_rate": valid / n}


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts framed and tokenised exactly as in training (trainers.packing), left-padded so every
    continuation starts at the same column: (input_ids, attention_mask)."""
    pad = pad_token_id(tokenizer)
    ids = PromptFormat().prompt_ids(tokenizer, prompts)
    width = max(len(x) for x in ids)
    return (torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
            torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))


@torch.no_grad()
def ranked_picks(model, tokenizer, prompts: list[str], batch_size: int) -> list[str]:
    """The candidate the model rates highest at the answer position: a softmax over the prompt's candidate
    item tokens only (one forward pass per prompt, no free generation), so every pick is a valid candidate."""
    picks = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        input_ids, mask = left_padded(tokenizer, chunk)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
        for row, prompt in enumerate(chunk):
            tokens = [f"<item_{i}>" for i in candidate_tokens(prompt)]
            token_ids = tokenizer.convert_tokens_to_ids(tokens)
            if not tokens or tokenizer.unk_token_id in token_ids:
                raise DataError("samples/test", "direct_recommendation prompt without known candidate item tokens",
                                row=prompt[:80])
            picks.append(tokens[int(logits[row, token_ids].argmax())])
    return picks


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of prompts framed and tokenised exactly as in training (trainers.packing)."""
    from tqdm import tqdm

    pad = pad_token_id(tokenizer)
    out = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="decode", unit="batch"):
        input_ids, mask = left_padded(tokenizer, prompts[s: s + batch_size])
        width = input_ids.shape[1]
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [r.strip() for r in out]


def run_evaluate_reviews(cfg) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipeline.reviews.build_reviews import read_reviews

    c = cfg.review_tasks
    layout = RunLayout(cfg.run_dir)
    model_dir = Path(layout.model)
    if not (model_dir / "config.json").exists():
        raise DataError(str(model_dir), "no exported model; run `recllm train` first")
    test = storage.read_parquet(layout.samples_split("test")).to_pandas().sort_values("sample_id")
    reviews = read_reviews(cfg.run_dir, c.domain).to_pandas()
    train_mean = float(reviews.rating[reviews.split == "train"].mean())
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    budget = {"rating": 4, "direct_recommendation": 6}
    tasks, examples = {}, {}
    for task in c.tasks:
        rows = test[test.task == task].head(c.eval_per_task)
        prompts, refs = rows.prompt.tolist(), rows.response.tolist()
        replies = greedy_replies(model, tokenizer, prompts, min(budget.get(task, c.max_new_tokens), c.max_new_tokens),
                                 c.eval_batch_size)
        if task == "rating":
            scores = rating_scores(replies, [float(r) for r in refs], train_mean)
        elif task == "direct_recommendation":
            popularity = reviews[reviews.split == "train"].item_id.value_counts().to_dict()
            popular = [max(candidate_tokens(p), key=lambda i: popularity.get(int(i), 0)) for p in prompts]
            ranked = ranked_picks(model, tokenizer, prompts, c.eval_batch_size)
            scores = {**pick_scores(replies, refs, prompts), "chance": 1 / c.candidates,
                      "ranked_hit_rate": float(np.mean([p == r for p, r in zip(ranked, refs)])),
                      "popular_candidate_hit_rate": float(np.mean([f"<item_{i}>" == r for i, r in zip(popular, refs)]))}
        else:
            scores = text_scores(replies, refs)
        tasks[task] = {"n": len(rows), **scores}
        examples[task] = [{"prompt": p, "reference": r, "reply": y} for p, r, y in zip(prompts[:3], refs[:3], replies[:3])]
        log.info("%s: %s", task, tasks[task])
    info = json.loads((model_dir / "recllm_model.json").read_text())
    report = {"domain": c.domain, "model": info, "tasks": tasks, "examples": examples}
    _write(cfg, report)
    return report


def _write(cfg, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["tasks"]
    lines = [f"# ControlRec review tasks on {report['domain']} (test split, greedy decoding)", "",
             f"Model: {report['model']['size']}, {report['model']['finetune']} fine-tuning, "
             f"{report['model']['step']} steps.", "", "| task | n | metric | value |", "|---|---|---|---|"]
    if "rating" in t:
        r = t["rating"]
        lines += [f"| rating | {r['n']} | MSE / RMSE | {r['mse']:.4f} / {r['rmse']:.4f} "
                  f"(train mean: {r['train_mean_mse']:.4f}; {r['unparsed']} unparsed) |"]
    for task in ("explanation", "review_summary"):
        if task in t:
            lines += [f"| {task} | {t[task]['n']} | ROUGE-L F1 / BLEU | {t[task]['rougeL']:.2f} / {t[task]['bleu']:.2f} |"]
    if "direct_recommendation" in t:
        d = t["direct_recommendation"]
        lines += [f"| direct_recommendation | {d['n']} | hit rate (chance) | {d['hit_rate']:.3f} ({d['chance']:.3f}); "
                  f"valid picks {d['valid_pick_rate']:.3f}; ranked over the candidates {d['ranked_hit_rate']:.3f}; "
                  f"most popular candidate {d['popular_candidate_hit_rate']:.3f} |"]
    lines += ["", "## Examples", ""]
    for task, exs in report["examples"].items():
        for e in exs[:2]:
            lines += [f"- **{task}**: prompt `{e['prompt'][:160]}` -> reply `{e['reply'][:120]}` "
                      f"(reference `{e['reference'][:120]}`)"]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = {k: v for k, v in (("explanation ROUGE-L", t.get("explanation", {}).get("rougeL")),
                              ("summary ROUGE-L", t.get("review_summary", {}).get("rougeL")),
                              ("explanation BLEU", t.get("explanation", {}).get("bleu")),
                              ("summary BLEU", t.get("review_summary", {}).get("bleu"))) if v is not None}
    ax.barh(list(bars), list(bars.values()))
    ax.set_xlabel("score (0-100)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    with storage.staged_folder(RunLayout(cfg.run_dir).report("review_tasks")) as staged:
        staged.write_bytes("report.json", json.dumps(report, indent=2).encode())
        staged.write_bytes("report.md", ("\n".join(lines) + "\n").encode())
        staged.write_bytes("scores.png", buf.getvalue())
