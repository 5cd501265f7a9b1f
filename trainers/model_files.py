"""Checks of a Hugging Face model folder's files before any weight is read: config.json (a family the trainer
runs, the shape the config names), the weight files (there, none cut short) and the vocabulary against the
run's new tokens. `train` runs them on model.checkpoint and `infer` on run_dir/model before Ray starts, so a
bad folder is one line naming the file instead of a worker's traceback. Reads JSON and file headers only.
"""

from __future__ import annotations

import json
import posixpath
import struct

from data_pipeline import storage
from data_pipeline.errors import DataError
from trainers.model_config import FAMILIES

SHAPE_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}
"""LlamaShape field -> config.json key."""
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_model_config(folder: str, missing: str) -> dict:
    """config.json of ``folder``, refused unless its model_type is one of FAMILIES."""
    uri = storage.join(folder, "config.json")
    config = storage.read_json(uri, missing)
    if not isinstance(config, dict):
        raise DataError(uri, f"expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") not in FAMILIES:
        raise DataError(uri, f"a {config.get('model_type')!r} model; recllm trains and serves {list(FAMILIES)}",
                        field="model_type")
    return config


def check_shape(folder: str, config: dict, expected: dict[str, int], size: str) -> None:
    """The checkpoint has the shape ``model.size`` names (``expected``: LlamaShape field -> value)."""
    for name, key in SHAPE_FIELDS.items():
        found = config.get(key, config.get("num_attention_heads") if key == "num_key_value_heads" else None)
        if name in expected and found != expected[name]:
            raise DataError(storage.join(folder, "config.json"), f"not a {size} model: checkpoint {found}, "
                            f"model.size {size} has {expected[name]}; set model.size=auto to take its shape",
                            field=key)


def check_safetensors(uri: str) -> None:
    """The file is as long as its header says: a copy cut short (full disk, killed transfer) is refused here,
    not halfway through loading."""
    fs, path = storage.filesystem(uri)
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if header_len is None or header_len > size - 8:
            raise DataError(uri, f"{size} bytes: too short for its safetensors header; truncated or not "
                                 "safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise DataError(uri, "safetensors header is not JSON; the file is damaged") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise DataError(uri, f"{size} bytes, its header describes {8 + header_len + end}: truncated or damaged")


def check_weights(folder: str) -> None:
    """At least one weight file, each present (sharded: every shard the index names) and none truncated."""
    fs, root = storage.filesystem(folder)
    names = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    shards = {n for n in names if n.endswith(".safetensors")}
    if SAFETENSORS_INDEX in names:
        index = storage.read_json(storage.join(folder, SAFETENSORS_INDEX))
        named = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
        for shard in sorted(named - shards):
            raise DataError(storage.join(folder, shard), f"named by {SAFETENSORS_INDEX} but missing")
    if not shards and not any(n.endswith(".bin") for n in names):
        raise DataError(folder, "config.json but no weights (*.safetensors or *.bin); copy the whole model "
                                "folder, or rerun the stage that wrote it")
    for shard in sorted(shards):
        check_safetensors(storage.join(folder, shard))


def tokenizer_vocabulary(folder: str) -> tuple[dict[str, int], set[str]] | None:
    """(token -> id, added tokens) from tokenizer.json; None when the folder has none (a SentencePiece-only
    tokenizer), and the check that needs it is skipped."""
    uri = storage.join(folder, "tokenizer.json")
    if not storage.exists(uri):
        return None
    data = storage.read_json(uri)
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {row[0]: i for i, row in enumerate(vocab)}
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {**ids, **added}, set(added)


def check_new_tokens_present(folder: str, config: dict, tokens: list[str], tokens_uri: str,
                             new_items_from_text: bool = False) -> None:
    """Every token build-ids added is in the model's vocabulary, within its embedding rows: a model trained on
    other item IDs would otherwise score tokens it never learned, or index past its table. With
    ``new_items_from_text`` (item text vectors and the multinomial scorer) a token the model lacks is an item added
    since training, scored from its text; at least one token must still be the model's."""
    vocabulary = tokenizer_vocabulary(folder)
    if vocabulary is None or not tokens:
        return
    ids, _ = vocabulary
    absent = [t for t in tokens if t not in ids]
    if absent and not (new_items_from_text and len(absent) < len(tokens)):
        raise DataError(tokens_uri, f"{len(absent)} of its {len(tokens)} tokens are not in the vocabulary of "
                                    f"{folder} (e.g. {absent[0]}): the model was trained on other item IDs; "
                                    "rerun `recllm train`, or set infer.model_dir to this item_ids/'s model")
    rows = config.get("vocab_size")
    beyond = [t for t in tokens if rows is not None and t in ids and ids[t] >= rows]
    if beyond:
        raise DataError(storage.join(folder, "config.json"), f"vocab_size {rows}, but token {beyond[0]} has id "
                                                             f"{ids[beyond[0]]}; the folder mixes two models",
                        field="vocab_size")


def check_new_tokens_fresh(folder: str, tokens: list[str], tokens_uri: str) -> None:
    """No new token is already a base-vocabulary token of the checkpoint (it would share that token's row)."""
    vocabulary = tokenizer_vocabulary(folder)
    if vocabulary is None:
        return
    ids, added = vocabulary
    clashes = [t for t in tokens if t in ids and t not in added]
    if clashes:
        raise DataError(tokens_uri, f"{len(clashes)} of its tokens are ordinary tokens of "
                                    f"{storage.join(folder, 'tokenizer.json')} (e.g. {clashes[0]!r}); new item "
                                    "tokens must be new to the vocabulary")


def expected_shape(model_cfg) -> dict[str, int]:
    """The shape ``model.size`` fixes (nothing for auto, which takes the checkpoint's)."""
    if model_cfg.size == "tiny":
        return {name: getattr(model_cfg.tiny, name) for name in SHAPE_FIELDS}
    if model_cfg.size == "auto":
        return {}
    from trainers import models

    shape = {"llama2_7b": models.LLAMA2_7B, "llama2_13b": models.LLAMA2_13B,
             "smollm2_135m": models.SMOLLM2_135M}[model_cfg.size]
    return {name: getattr(shape, name) for name in SHAPE_FIELDS}


def check_checkpoint(model_cfg, tokens: list[str], tokens_uri: str) -> None:
    """model.checkpoint before training: family, the shape model.size names, weights, and the new tokens."""
    folder = model_cfg.checkpoint
    if not folder:
        return
    config = read_model_config(folder, "no config.json; model.checkpoint must be a Hugging Face model folder")
    check_shape(folder, config, expected_shape(model_cfg), model_cfg.size)
    check_weights(folder)
    check_new_tokens_fresh(folder, tokens, tokens_uri)


def check_trained_model(model_dir: str, tokens: list[str], tokens_uri: str, new_items_from_text: bool = False) -> dict:
    """run_dir/model (or infer.model_dir) before inference; returns its config.json."""
    config = read_model_config(model_dir, "no model (config.json); run `recllm train` first, or set "
                                          "infer.model_dir")
    check_weights(model_dir)
    check_new_tokens_present(model_dir, config, tokens, tokens_uri, new_items_from_text)
    return config
