"""A toy run_dir for the fault tests (bad stage input, full disk): 30 users over 12 items on the demo config,
prepared, with item IDs, samples and a model exported the way `recllm train` exports one, but untrained (these
tests need a model folder, not a good model). Each stage runs in-process through the CLI in about a second."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import main
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "demo.yaml")
SEQUENCES = {str(u): [(u + k) % 12 for k in range(5)] for u in range(30)}
FAST = ["infer.num_replicas=1", "infer.top_k=5", "infer.users_per_shard=16", "eval.baseline=false", "eval.ks=[1,5]",
        "model.new_token_init=mean"]  # no baseline stage in the toy run
"""Overrides that keep infer and evaluate on the toy run to seconds (no SASRec baseline)."""


def stage(command: str, run_dir: Path, *overrides: str) -> int:
    """`recllm COMMAND configs/demo.yaml run_dir=RUN_DIR ...` in this process; its exit code."""
    return main([command, CONFIG, f"run_dir={run_dir}", *FAST, *overrides])


def write_raw(folder: Path, sequences: dict[str, list[int]] = SEQUENCES) -> Path:
    folder.mkdir(parents=True)
    (folder / "Toy.inter.json").write_text(json.dumps(sequences))
    return folder


def export_untrained_model(run_dir: Path) -> None:
    """run_dir/model as export writes it: weights, tokenizer with the item tokens, recllm_model.json and the
    sequence prompt format the demo trains with."""
    from data_pipeline.samples.prompt_format import PromptFormat
    from launcher.config import load_config
    from trainers.models import build_model

    cfg = load_config(CONFIG, [f"run_dir={run_dir}"])
    tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    model, tokenizer = build_model(cfg.model, tokens, seed=1)
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    (run_dir / "model" / "recllm_model.json").write_text(json.dumps({"step": 0}))
    (run_dir / "model" / "prompt_format.json").write_text(PromptFormat("sequence", 50).to_json())


def build_toy_run(root: Path, sequences: dict[str, list[int]] = SEQUENCES) -> Path:
    """root/run with dataset/, item_ids/, samples/ and model/ (no topk/): every input of train and infer."""
    raw = write_raw(root / "raw", sequences)
    run_dir = root / "run"
    assert stage("prepare", run_dir, f"data.path={raw}", "data.name=Toy") == 0
    for command in ("build-ids", "build-samples"):
        assert stage(command, run_dir) == 0
    export_untrained_model(run_dir)
    return run_dir


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path: to compare a folder before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


VOLATILE = {"created", "seconds", "total_seconds"}
"""Manifest and stats keys that record when and how long, not what: left out when two runs are compared."""


def comparable(files: dict[str, bytes]) -> dict[str, object]:
    """``tree`` output with every JSON file parsed and its VOLATILE keys dropped; every other file as bytes."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return {rel: strip(json.loads(data)) if rel.endswith(".json") else data for rel, data in files.items()}
