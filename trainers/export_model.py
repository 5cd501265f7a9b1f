"""Turn the chosen training weights into `run_dir/model/`: a Hugging Face folder (safetensors, with the
tokenizer and its added tokens, and the prompt format it was trained with) that inference loads with
`from_pretrained`. The weights are the best valid round's (``train/best``) when training validated, else the
last checkpoint's. LoRA runs also keep the PEFT adapter; the merged model is what inference uses.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from data_pipeline import storage
from data_pipeline.run_layout import CheckpointFiles, RunLayout, TrainLayout
from data_pipeline.samples.prompt_format import PROMPT_FORMAT_FILE

log = logging.getLogger("recllm.train")

MODEL_INFO = "recllm_model.json"


def export_checkpoint(cfg, checkpoint_dir: str | Path, new_tokens: list[str], token_texts=None,
                      out_uri: str | None = None, prompt_format=None) -> str:
    """Export ``checkpoint_dir`` (trainer_state.json + model/weights.safetensors), or the best valid round's
    weights when training kept one."""
    from trainers.best_checkpoint import read_best

    checkpoint_dir = Path(checkpoint_dir)
    state = json.loads((checkpoint_dir / CheckpointFiles.STATE).read_text())
    weights = checkpoint_dir / CheckpointFiles.WEIGHTS
    best_dir = TrainLayout(RunLayout(storage.absolute(cfg.run_dir)).train).best
    best = read_best(best_dir) if cfg.train.select_best else None
    if best is not None:
        state = {"step": best["step"], "lora": best["lora"], "valid": best["metrics"],
                 "last_step": state["step"]}
        weights = Path(storage.local_copy(best_dir)) / CheckpointFiles.BEST_WEIGHTS
    return export_weights(cfg, weights, state, new_tokens, token_texts, out_uri, prompt_format)


def export_weights(cfg, weights: Path, state: dict, new_tokens: list[str], token_texts=None,
                   out_uri: str | None = None, prompt_format=None) -> str:
    from trainers.deepspeed_engine import load_weights
    from trainers.lora_adapters import apply_lora
    from trainers.models import build_model

    model, tokenizer = build_model(cfg.model, new_tokens, token_texts=token_texts, seed=cfg.seed)
    lora = state["lora"]
    if lora:
        t = cfg.train
        new_ids = tokenizer.convert_tokens_to_ids(new_tokens) if new_tokens else []
        model = apply_lora(model, new_ids, t.lora_r, t.lora_alpha, t.lora_dropout, t.lora_target_modules)
    load_weights(model, weights, trainable_only=lora)
    out_uri = out_uri or RunLayout(cfg.run_dir).model
    with (storage.staged_folder(out_uri) as staged, tempfile.TemporaryDirectory(prefix="recllm-export-") as scratch,
          storage.writing(out_uri, f"; nothing was published, {out_uri} is as it was")):
        # Hugging Face writes to a local folder: the staged folder itself when local, else a scratch folder
        # whose files are then copied into the remote staged folder.
        remote = storage.is_remote(out_uri)
        local = Path(scratch) if remote else Path(staged.tmp_path)
        if lora:
            model.save_pretrained(str(local / "adapter"))
            model = model.merge_and_unload()
        model.save_pretrained(str(local), safe_serialization=True)
        tokenizer.save_pretrained(str(local))
        info = {"step": state["step"], "size": cfg.model.size, "finetune": "lora" if lora else "full",
                "new_tokens": len(new_tokens), "vocab_size": model.config.vocab_size,
                **{k: state[k] for k in ("valid", "last_step") if k in state}}
        (local / MODEL_INFO).write_text(json.dumps(info, indent=2))
        if prompt_format is not None:
            (local / PROMPT_FORMAT_FILE).write_text(prompt_format.to_json())
        files = sorted(p for p in local.rglob("*") if p.is_file())
        mode = storage.umask_file_mode()
        for p in files:
            p.chmod(mode)
        if remote:
            for p in files:
                staged.put_file(p.relative_to(local).as_posix(), str(p))
        else:
            staged.files = {p.relative_to(local).as_posix(): {} for p in files}
    log.info("exported step %d%s to %s", state["step"],
             f" (best valid round, {state['valid']})" if "valid" in state else "", out_uri)
    return out_uri
