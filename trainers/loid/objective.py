"""LoID as a registered objective (``train.objective=loid``): the shared Ray Train loop trains one planned run
(a source domain's plugin, or a target variant) with checkpoints, resume and GPUs like any recipe. Its hooks
supply what is not a packed LM: the LoIDRegressor (frozen base + frozen source plugins + a trainable domain
LoRA), the domain's review batches, valid MSE after every epoch (the best epoch is exported), the export:
run_dir/loid/<run>/{plugin/<domain>/ (peft), domain_state.safetensors, run.json}, training state in train/, and
the workload `recllm plan` sizes (no new tokens, no logits). Pure torch/peft: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline.run_layout import CheckpointFiles, RunLayout, TrainLayout
from trainers.recipes.contract import BuiltModel, ObjectiveContext
from trainers.recipes.recipe import PackedLMRecipe
from trainers.recipes.registry import register_objective

log = logging.getLogger("recllm.loid")


def planned_runs(cfg) -> list[dict]:
    """Source runs first (their plugins feed loid_plugin), then the target variants, in config order."""
    c = cfg.loid
    runs = [{"name": f"source_{d}", "domain": d, "sources": [], "cl_weight": c.cl_weight} for d in c.source_domains]
    for variant in c.variants:
        runs.append({"name": variant, "domain": c.target_domain,
                     "sources": list(c.source_domains) if variant == "loid_plugin" else [],
                     "cl_weight": 0.0 if variant == "loid_no_cl" else c.cl_weight})
    return runs


def run_spec(cfg) -> dict:
    """The planned run ``loid.run`` names."""
    runs = {r["name"]: r for r in planned_runs(cfg)}
    if cfg.loid.run not in runs:
        from data_pipeline.config_schema import ConfigError

        raise ConfigError([f"loid.run: {cfg.loid.run!r} is not a planned run; expected one of {sorted(runs)}"])
    return runs[cfg.loid.run]


def run_config(cfg, name: str):
    """The config that trains planned run ``name``: train.objective=loid, loid.run=name and train.max_steps =
    loid.epochs over the domain's train reviews at train.micro_batch_size x train.num_workers (capped by
    loid.max_steps). Reads the domain's reviews, so a missing build-reviews stops here, before Ray starts."""
    from data_pipeline import storage
    from data_pipeline.reviews.build_reviews import read_reviews

    cfg = dataclasses.replace(cfg, run_dir=storage.absolute(cfg.run_dir), loid=dataclasses.replace(cfg.loid, run=name))
    run, t = run_spec(cfg), cfg.train
    splits = read_reviews(cfg.run_dir, run["domain"]).column("split").to_pylist()
    per_epoch = splits.count("train") // (t.micro_batch_size * t.num_workers)
    if per_epoch == 0:
        from data_pipeline.config_schema import ConfigError

        raise ConfigError([f"train.micro_batch_size: {t.micro_batch_size} x train.num_workers {t.num_workers} is "
                           f"more than the {splits.count('train')} train reviews of {run['domain']}"])
    steps = per_epoch * cfg.loid.epochs
    steps = min(steps, cfg.loid.max_steps) if cfg.loid.max_steps else steps
    return dataclasses.replace(cfg, train=dataclasses.replace(t, objective="loid", max_steps=steps))


def build_loid_model(cfg, run: dict, reviews, tokenizer_and_lm=None):
    """(LoIDRegressor, tokenizer) for ``run``: frozen base, frozen source plugins, a trainable domain LoRA."""
    from trainers.loid.model import LoIDRegressor
    from trainers.loid.plugins import attach_plugins, lora_config
    from trainers.models import build_model

    c = cfg.loid
    lm, tokenizer = tokenizer_and_lm or build_model(cfg.model, [], device="cpu", seed=cfg.seed)
    root = Path(RunLayout(cfg.run_dir).loid()).resolve()
    sources = {d: root / f"source_{d}" / "plugin" / d for d in run["sources"]}
    missing = [str(p) for p in sources.values() if not (p / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"source plugin(s) {missing} missing: train the source domains first")
    peft_model = attach_plugins(lm, run["domain"], lora_config(c.lora_r, c.lora_alpha, c.lora_target_modules),
                                sources, merge=c.plugins == "merge")
    train_ratings = reviews.ratings[reviews.rows("train")]
    model = LoIDRegressor(peft_model, tokenizer, reviews.num_users, reviews.num_items, c.pooling, run["cl_weight"],
                          c.margin, float(train_ratings.mean()))
    return model, tokenizer


def _build_for_run(cfg, run: dict):
    from data_pipeline.reviews.build_reviews import read_reviews
    from trainers.loid.batches import DomainReviews
    from trainers.models import build_model

    lm, tokenizer = build_model(cfg.model, [], device="cpu", seed=cfg.seed)
    reviews = DomainReviews(read_reviews(cfg.run_dir, run["domain"]), tokenizer, cfg.loid.review_tokens, cfg.reviews.k)
    model, _ = build_loid_model(cfg, run, reviews, (lm, tokenizer))
    return model, tokenizer, reviews


def frozen_digest(module) -> dict:
    """sha256 over every frozen parameter (base LM and source plugins), and how many there are of each."""
    import hashlib

    digest, counts = hashlib.sha256(), {"base": 0, "plugins": 0}
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        counts["plugins" if ".lora_" in name else "base"] += p.numel()
    return {"sha256": digest.hexdigest(), **counts}


def _zero_stage(path: str) -> int:
    repo = Path(__file__).resolve().parents[2]
    p = Path(path) if Path(path).is_absolute() else repo / path
    return int(json.loads(p.read_text()).get("zero_optimization", {}).get("stage", 0))


def memory_workload(cfg, run: dict, ids: tuple[int, int], ids_note: str, hidden: int, prompt_tokens: int):
    """What one step of ``run`` holds, for `recllm plan`: the LM body runs (no lm_head, no logits) over the
    batch's unique history reviews (k per user and k per item at most: the bound, where none is shared) and over
    the rating prompts [user ID, item ID, two attention reads, PROMPT]; trainable are the run's LoRA, the
    domain's ID embeddings, the key/value projections and the head (model.py); the source plugins ride along
    frozen. Returns a ``memory_plan.Workload``."""
    from trainers.loid.plugins import lora_config
    from trainers.memory_plan import Workload

    c, b, k = cfg.loid, cfg.train.micro_batch_size, cfg.reviews.k
    users, items = ids
    hints = [f"train.micro_batch_size={max(2, b // 2)}"] if b > 2 else []
    hints += [f"loid.review_tokens={c.review_tokens // 2}"] if c.review_tokens > 1 else []
    hints += [f"reviews.k={k // 2}"] if k > 1 else []
    return Workload(
        recipe="LoID", run=run["name"],
        tokens_per_micro_batch=b * 2 * k * c.review_tokens + b * (4 + prompt_tokens),
        lora_r=c.lora_r, lora_target_modules=list(c.lora_target_modules),
        added={f"user + item ID embeddings, {users:,} + {items:,} rows": (users + items) * hidden,
               "key/value projections": 2 * hidden * hidden, "rating head": hidden + 1},
        frozen_adapters=len(run["sources"]),
        lora_input_copies=lora_config(c.lora_r, c.lora_alpha, c.lora_target_modules).lora_dropout > 0,
        gradient_checkpointing=False,  # build_model below never turns it on
        note=ids_note, hints=hints)


def _domain_ids(cfg, domain: str) -> tuple[tuple[int, int], str]:
    """(users, items) of ``domain``'s ID embeddings, from its build-reviews output, and where they came from:
    (0, 0) before build-reviews, or where run_dir is out of reach (the dry run needs no credentials)."""
    from data_pipeline.errors import DataError
    from data_pipeline.reviews.build_reviews import read_reviews
    from trainers.loid.batches import id_rows

    try:
        users, items = id_rows(read_reviews(cfg.run_dir, domain, ["user_id", "item_id"]))
    except DataError:
        return (0, 0), f"{domain}: users and items unknown until `recllm build-reviews` (0 assumed)"
    except Exception as exc:  # noqa: BLE001 - botocore, fsspec and OS errors alike mean "cannot tell"
        log.warning("plan: cannot read the reviews of %s (%s); planning without their IDs", domain,
                    type(exc).__name__)
        return (0, 0), f"{domain}: reviews unreadable ({type(exc).__name__}), users and items 0 assumed"
    return (users, items), f"{domain}: {users:,} users + {items:,} items (build-reviews)"


@register_objective("loid")
class LoIDObjective(PackedLMRecipe):
    """L = L_rec + lambda * L_cl on one domain's reviews (model.py); the best epoch by valid MSE is exported."""

    selection = ("valid_mse", False)
    """BestCheckpoint keeps the round with the lowest valid MSE."""
    validates_itself = True
    """Valid MSE after every epoch (``validate``), not the ranking rounds."""

    def __init__(self, reviews, run: dict, batch_size: int, seed: int, frozen_before: dict):
        self.reviews, self.run, self.batch_size, self.seed = reviews, run, batch_size, seed
        self.frozen_before, self.t0 = frozen_before, time.perf_counter()
        self.valid_rows = reviews.rows("valid")

    # ---------------------------------------------------------------- driver side
    @staticmethod
    def check(root) -> list[str]:
        problems = []
        names = [r["name"] for r in planned_runs(root)]
        if root.loid.run and root.loid.run not in names:
            problems.append(f"loid.run: {root.loid.run!r} is not a planned run; expected one of {names}")
        if root.train.micro_batch_size < 2:
            problems.append(f"train.micro_batch_size: {root.train.micro_batch_size}; LoID's in-batch negatives "
                            f"need at least 2")
        try:
            stage = _zero_stage(root.train.deepspeed_config)
        except (OSError, json.JSONDecodeError) as exc:
            stage = None
            problems.append(f"train.deepspeed_config: cannot read {root.train.deepspeed_config}: {exc}")
        if stage == 3:  # untested: the per-epoch validation and the frozen-part digest read parameters directly
            problems.append(f"train.deepspeed_config: {root.train.deepspeed_config} is ZeRO-3; LoID runs use "
                            f"ZeRO-0/1/2")
        return problems

    @classmethod
    def memory_workloads(cls, cfg) -> list:
        """`recllm plan`: one Workload per run this config trains (``loid.run``, else every planned run)."""
        from trainers.loid.model import PROMPT
        from trainers.memory_plan import model_shape
        from trainers.models import load_tokenizer

        runs = [run_spec(cfg)] if cfg.loid.run else planned_runs(cfg)
        hidden = model_shape(cfg.model)[1].hidden_size
        tokenizer = load_tokenizer(cfg.model)  # None: a LLaMA-2 size without checkpoint, 1 token a char at most
        prompt = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) if tokenizer else len(PROMPT)
        ids = {d: _domain_ids(cfg, d) for d in dict.fromkeys(r["domain"] for r in runs)}
        return [memory_workload(cfg, run, *ids[run["domain"]], hidden, prompt) for run in runs]

    @classmethod
    def inputs(cls, cfg) -> dict:
        from data_pipeline import storage
        from data_pipeline.reviews.build_reviews import read_reviews

        run = run_spec(cfg)
        for domain in {run["domain"], *run["sources"]}:
            read_reviews(cfg.run_dir, domain)  # fail here, with the file named, not inside a worker
        return {"run_dir": storage.absolute(cfg.run_dir), "new_tokens": [], "tasks": [], "token_texts": None,
                "prompt_format": None}

    @classmethod
    def train_dir(cls, cfg) -> str:
        from data_pipeline import storage

        return storage.join(RunLayout(storage.absolute(cfg.run_dir)).loid(run_spec(cfg)["name"]), "train")

    @classmethod
    def export(cls, cfg, checkpoint_dir, inputs: dict, train_dir: str) -> str:
        """The chosen weights (best epoch, else the last checkpoint) as the run's plugin, domain state and
        run.json (written last: a run without it did not finish)."""
        from safetensors.torch import load_file, save_file

        from data_pipeline import storage
        from trainers.best_checkpoint import read_best
        from trainers.loid.plugins import save_plugin
        from trainers.metrics_logger import read_metrics

        run = run_spec(cfg)
        checkpoint_dir = Path(checkpoint_dir)
        state = json.loads((checkpoint_dir / CheckpointFiles.STATE).read_text())
        best_dir = TrainLayout(train_dir).best
        best = read_best(best_dir) if cfg.train.select_best else None
        weights = (Path(storage.local_copy(best_dir)) / CheckpointFiles.BEST_WEIGHTS if best
                   else checkpoint_dir / CheckpointFiles.WEIGHTS)
        model, _, _ = _build_for_run(cfg, run)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise KeyError(f"{weights}: does not match run {run['name']} ({unexpected[:3]}, "
                           f"{sorted(trainable & set(missing))[:3]})")
        out = Path(RunLayout(inputs["run_dir"]).loid(run["name"]))
        (out / "run.json").unlink(missing_ok=True)
        save_plugin(model.lm, run["domain"], out / "plugin")
        save_file({k: v.contiguous() for k, v in model.domain_state().items()}, str(out / "domain_state.safetensors"))
        train_logs = [r for r in read_metrics(TrainLayout(train_dir).local_logs) if "loss" in r]
        last = train_logs[-1] if train_logs else {}
        finished = json.loads(TrainLayout(train_dir).local_objective(0).read_text())
        info = {**run, "steps": state["step"], "loss": last.get("loss"), "l_rec": last.get("objective/l_rec"),
                "l_cl": last.get("objective/l_cl"), "seconds": finished["seconds"],
                "best_step": best["step"] if best else state["step"],
                "best_valid_mse": best["metrics"]["valid_mse"] if best else None,
                "frozen": {"before": finished["frozen_before"], "after": finished["frozen_after"]},
                "workers": cfg.train.num_workers}
        (out / "run.json").write_text(json.dumps(info, indent=2))
        return str(out)

    # ---------------------------------------------------------------- worker side
    @classmethod
    def build_model(cls, cfg, config: dict) -> BuiltModel:
        run = run_spec(cfg)
        model, tokenizer, reviews = _build_for_run(cfg, run)
        return BuiltModel(model, tokenizer, trainable_only=True,
                          data={"reviews": reviews, "run": run, "frozen_before": frozen_digest(model)})

    @classmethod
    def build(cls, ctx: ObjectiveContext):
        return cls(ctx.data["reviews"], ctx.data["run"], ctx.train.micro_batch_size, ctx.seed,
                   ctx.data["frozen_before"])

    def batches(self, cfg, config: dict, tokenizer, rank: int, world: int):
        from trainers.loid.batches import ReviewFeed

        return ReviewFeed(self.reviews, self.reviews.rows("train"), self.batch_size, rank, world, self.seed)

    def loss(self, model, batch, step: int, device):
        out = model(batch.to(device))
        return out["loss"], np.zeros((0, 2)), {"l_rec": float(out["l_rec"].detach()),
                                               "l_cl": float(out["l_cl"].detach())}

    @torch.no_grad()
    def validate(self, model, step: int, feed, final: bool) -> dict[str, float]:
        """Valid MSE after every epoch and at the last step; every rank scores all valid reviews (equal replicas
        give equal scores, so every rank makes the same best-epoch decision)."""
        if not (feed.epoch_done or final) or not len(self.valid_rows):
            return {}
        module = model.module if hasattr(model, "module") else model
        device = next(module.parameters()).device
        module.eval()
        rows, preds = self.valid_rows, []
        for s in range(0, len(rows), 64):
            preds.append(module(self.reviews.batch(rows[s: s + 64]).to(device))["pred"].float().clamp(1.0, 5.0))
        module.train()
        truth = torch.as_tensor(self.reviews.ratings[rows], device=device)
        return {"valid_mse": float(((torch.cat(preds) - truth) ** 2).mean())}

    def finish(self, module) -> dict:
        return {"frozen_before": self.frozen_before, "frozen_after": frozen_digest(module),
                "seconds": round(time.perf_counter() - self.t0, 1)}
