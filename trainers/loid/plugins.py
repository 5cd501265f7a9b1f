"""Domain plugins: a LoRA adapter per domain, saved with peft ``save_pretrained`` under the domain's name.
A target run loads the frozen base, loads the source plugins frozen (stacked: all active at once; or merged
into one adapter with ``add_weighted_adapter(combination_type="cat")``, which sums the LoRA deltas exactly)
and adds one trainable target LoRA (re-LoRA). Pure peft/torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from peft import LoraConfig, PeftModel, get_peft_model

log = logging.getLogger("recllm.loid")

MERGED = "merged_sources"


def lora_config(r: int, alpha: int, target_modules: Sequence[str], dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))


def attach_plugins(lm, target: str, config: LoraConfig, sources: Mapping[str, str | Path] | None = None,
                   merge: bool = False) -> PeftModel:
    """``lm`` (frozen) + each source plugin (frozen) + a new trainable adapter named ``target``, all active.

    sources: plugin name -> folder written by ``save_plugin``. merge=True replaces the sources with one
    adapter holding their sum. Only parameters of ``target`` keep requires_grad.
    """
    sources = dict(sources or {})
    if not sources:
        model = get_peft_model(lm, config, adapter_name=target)
        active = [target]
    else:
        names = list(sources)
        model = PeftModel.from_pretrained(lm, str(sources[names[0]]), adapter_name=names[0], is_trainable=False)
        for name in names[1:]:
            model.load_adapter(str(sources[name]), adapter_name=name, is_trainable=False)
        if merge and len(names) > 1:
            model.add_weighted_adapter(names, [1.0] * len(names), adapter_name=MERGED, combination_type="cat")
            for name in names:
                model.delete_adapter(name)
            names = [MERGED]
        model.add_adapter(target, config)
        active = [*names, target]
    model.base_model.set_adapter(active)
    for name, p in model.named_parameters():
        p.requires_grad = f".{target}." in name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("plugins: active %s, trainable %s (%s parameters)", active, target, f"{trainable:,}")
    return model


def save_plugin(model: PeftModel, name: str, out_dir: str | Path) -> Path:
    """Write adapter ``name`` with peft save_pretrained; returns the folder ``attach_plugins`` reads."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), selected_adapters=[name])
    folder = out_dir / name if (out_dir / name / "adapter_config.json").exists() else out_dir
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{out_dir}: peft wrote no adapter_config.json for plugin {name!r}")
    return folder
