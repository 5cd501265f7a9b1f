"""Optimizer / scheduler / loader state as safetensors + JSON, never pickle.

A nested state_dict is split into its tensors (one safetensors file, keys are the paths) and its plain
leaves (JSON). Leaves that are neither (DeepSpeed's loss-scaler object, enums, slice mappings) are
structural: loading takes them from the live object's own state_dict, which has the same structure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_PLAIN = (bool, int, float, str, type(None))


def _flatten(obj: Any, path: str, tensors: dict, plain: dict) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{path}/{key}", tensors, plain)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{path}[{i}]", tensors, plain)
    elif isinstance(obj, _PLAIN):
        plain[path] = obj


def save_state(state: dict, prefix: str | Path) -> None:
    """Write ``prefix``.safetensors and ``prefix``.json."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    _flatten(state, "", tensors, plain)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{prefix}.safetensors")
    Path(f"{prefix}.json").write_text(json.dumps(plain))


def _overlay(live: Any, path: str, tensors: dict, plain: dict) -> Any:
    if isinstance(live, torch.Tensor):
        if path not in tensors:
            raise KeyError(f"saved state lacks tensor {path}")
        return tensors[path].to(dtype=live.dtype)
    if isinstance(live, dict):
        return {k: _overlay(v, f"{path}/{k}", tensors, plain) for k, v in live.items()}
    if isinstance(live, (list, tuple)):
        out = [_overlay(v, f"{path}[{i}]", tensors, plain) for i, v in enumerate(live)]
        return type(live)(out) if isinstance(live, tuple) else out
    if isinstance(live, _PLAIN):
        return plain.get(path, live)
    return live


def load_state(prefix: str | Path, live_state: dict) -> dict:
    """The saved state laid over ``live_state`` (the target's current state_dict, for structure)."""
    tensors = load_file(f"{prefix}.safetensors")
    plain = json.loads(Path(f"{prefix}.json").read_text())
    # Keys of the live dict that the saved one lacks (e.g. optimizer state not created yet) are rebuilt
    # from the saved paths: restore per-parameter optimizer state that did not exist before the first step.
    return _overlay(_with_saved_keys(live_state, "", tensors, plain), "", tensors, plain)


def _with_saved_keys(live: Any, path: str, tensors: dict, plain: dict) -> Any:
    if not isinstance(live, dict):
        if isinstance(live, (list, tuple)):
            return type(live)(_with_saved_keys(v, f"{path}[{i}]", tensors, plain) for i, v in enumerate(live))
        return live
    out = {k: _with_saved_keys(v, f"{path}/{k}", tensors, plain) for k, v in live.items()}
    prefix = f"{path}/"
    for key in list(tensors) + list(plain):
        if key.startswith(prefix):
            head = key[len(prefix):].split("/", 1)[0].split("[", 1)[0]
            if head not in {str(k) for k in out}:
                out_key: Any = int(head) if head.isdigit() else head
                out[out_key] = _rebuild(f"{prefix}{head}", tensors, plain)
    return out


def _rebuild(path: str, tensors: dict, plain: dict) -> Any:
    if path in tensors:
        return tensors[path]
    if path in plain:
        return plain[path]
    children: dict = {}
    for key in list(tensors) + list(plain):
        if key.startswith(path + "/"):
            head = key[len(path) + 1:].split("/", 1)[0].split("[", 1)[0]
            children[int(head) if head.isdigit() else head] = _rebuild(f"{path}/{head}", tensors, plain)
    return children
