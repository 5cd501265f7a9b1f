"""`recllm evaluate-loid`: test (and valid) MSE/RMSE of every saved LoID run on the target domain, next to
the global mean and a biased MF, as run_dir/report/loid/{report.json, report.md, mse.png}. The LoID models
are rebuilt from what train-loid saved (base + plugins + domain state), so the saved files are what is scored.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.reviews.build_reviews import read_reviews
from data_pipeline.run_layout import RunLayout

log = logging.getLogger("recllm.loid")

LABELS = {"global_mean": "global mean (train)", "mf": "biased MF", "loid": "LoID (target LoRA only)",
          "loid_no_cl": "LoID, lambda=0 (no contrastive)", "loid_plugin": "LoID + source plugin(s)"}


def load_run(cfg, run_dir: Path, reviews, tokenizer_and_lm=None):
    """Rebuild a trained run from its saved plugin(s) and domain state, in eval mode."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainers.loid.objective import build_loid_model

    run = json.loads((run_dir / "run.json").read_text())
    model, tokenizer = build_loid_model(cfg, run, reviews, tokenizer_and_lm)
    own = run_dir / "plugin" / run["domain"]
    peft_model: PeftModel = model.lm
    peft_model.delete_adapter(run["domain"])  # the freshly initialised one; load the trained weights instead
    peft_model.load_adapter(str(own), adapter_name=run["domain"], is_trainable=False)
    active = [n for n in peft_model.peft_config if n != run["domain"]] + [run["domain"]]
    peft_model.base_model.set_adapter(active)
    state = load_file(str(run_dir / "domain_state.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("lm.") for k in missing):
        raise KeyError(f"{run_dir}: domain state does not match the model ({unexpected[:3]}, {missing[:3]})")
    return model.eval(), run


@torch.no_grad()
def predict(model, reviews, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    out = [model(reviews.batch(rows[s: s + batch_size]))["pred"].float().numpy()
           for s in range(0, len(rows), batch_size)]
    return np.clip(np.concatenate(out), 1.0, 5.0)


def _scores(pred: np.ndarray, target: np.ndarray, prefix: str) -> dict:
    from trainers.matrix_factorization import mse

    m = mse(pred, target)
    return {f"{prefix}_mse": m, f"{prefix}_rmse": math.sqrt(m)}


def run_evaluate_loid(cfg) -> dict:
    from trainers.loid.batches import DomainReviews
    from trainers.matrix_factorization import fit_mf
    from trainers.models import build_model

    c = cfg.loid
    lm, tokenizer = build_model(cfg.model, [], device="cpu", seed=cfg.seed)
    reviews = DomainReviews(read_reviews(cfg.run_dir, c.target_domain), tokenizer, c.review_tokens, cfg.reviews.k)
    tr, va, te = (reviews.rows(s) for s in ("train", "valid", "test"))
    truth = {"valid": reviews.ratings[va], "test": reviews.ratings[te]}
    models: dict[str, dict] = {}
    mean = float(reviews.ratings[tr].mean())
    models["global_mean"] = {**_scores(np.full(len(va), mean), truth["valid"], "valid"),
                             **_scores(np.full(len(te), mean), truth["test"], "test")}
    arrays = {s: (reviews.user_ids[r], reviews.item_ids[r], reviews.ratings[r]) for s, r in
              (("train", tr), ("valid", va), ("test", te))}
    # A small grid chosen on valid MSE, so the baseline is tuned as much as the LoID runs are.
    fits = [fit_mf(arrays["train"], arrays["valid"], reviews.num_users, reviews.num_items, dim=dim,
                   weight_decay=wd, seed=cfg.seed) for dim in (8, 32) for wd in (1e-4, 1e-3, 1e-2)]
    mf = min(fits, key=lambda f: f.valid_mse)
    with torch.no_grad():
        pred = {s: np.clip(mf.model(torch.as_tensor(arrays[s][0]), torch.as_tensor(arrays[s][1])).numpy(), 1, 5)
                for s in ("valid", "test")}
    models["mf"] = {**_scores(pred["valid"], truth["valid"], "valid"), **_scores(pred["test"], truth["test"], "test"),
                    "best_epoch": mf.best_epoch, "dim": mf.dim, "weight_decay": mf.weight_decay}
    root = Path(RunLayout(cfg.run_dir).loid()).resolve()
    for variant in c.variants:
        run_dir = root / variant
        if not (run_dir / "run.json").exists():
            log.warning("no trained run %s; run `recllm train-loid` first", run_dir)
            continue
        lm, tokenizer = build_model(cfg.model, [], device="cpu", seed=cfg.seed)
        model, run = load_run(cfg, run_dir, reviews, (lm, tokenizer))
        models[variant] = {**_scores(predict(model, reviews, va), truth["valid"], "valid"),
                           **_scores(predict(model, reviews, te), truth["test"], "test"),
                           "steps": run["steps"], "train_seconds": run["seconds"], "cl_weight": run["cl_weight"],
                           "sources": run["sources"], "plugins": c.plugins if run["sources"] else ""}
    report = {"target_domain": c.target_domain, "source_domains": c.source_domains,
              "counts": {"train": len(tr), "valid": len(va), "test": len(te)}, "models": models}
    _write(cfg, report)
    return report


def _write(cfg, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# LoID rating prediction: {report['target_domain']} (target), sources {report['source_domains']}",
             "", f"Reviews: train {report['counts']['train']}, valid {report['counts']['valid']}, "
                 f"test {report['counts']['test']} (leave-last-out per user).", "",
             "| model | test MSE | test RMSE | valid MSE |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {LABELS.get(name, name)} | {m['test_mse']:.4f} | {m['test_rmse']:.4f} | {m['valid_mse']:.4f} |")
    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([LABELS.get(n, n) for n in names], [report["models"][n]["test_mse"] for n in names])
    ax.set_xlabel("test MSE (lower is better)")
    fig.tight_layout()
    with storage.staged_folder(RunLayout(cfg.run_dir).report("loid")) as staged:
        staged.write_bytes("report.json", json.dumps(report, indent=2).encode())
        staged.write_bytes("report.md", ("\n".join(lines) + "\n").encode())
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        staged.write_bytes("mse.png", buf.getvalue())
    plt.close(fig)
