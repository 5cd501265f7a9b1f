"""The subtoken scheme (ControlRec): an item's ID written as text, item_1471, and split by the LM's own tokenizer.

No tokens are added; codes are the tokenizer ids of the text (no special tokens). The codes vary in length
and one can be a prefix of another (item_5 / item_51), so a trie over them needs an end token.
"""

from __future__ import annotations

import pyarrow as pa

from data_pipeline.item_ids.item_codes import BuiltIds, item_codes_table


def item_text(item_id: int) -> str:
    return f"item_{item_id}"


def build_subtoken_ids(items: pa.Table, tokenizer) -> BuiltIds:
    """``tokenizer``: a Hugging Face tokenizer (called with add_special_tokens=False)."""
    texts = [item_text(i) for i in items.column("item_id").to_pylist()]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.convert_ids_to_tokens(ids) for ids in token_ids]
    lengths = [len(ids) for ids in token_ids]
    distinct = len({tuple(ids) for ids in token_ids})
    if distinct < len(texts):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} maps {len(texts) - distinct} item "
                         "texts onto another item's token ids; use a tokenizer without unknown-token fallbacks")
    stats = {"tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
             "tokens_per_item": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                                 "mean": sum(lengths) / max(1, len(lengths))},
             "collisions": {"before": {"duplicate_codes": 0}, "after": {"duplicate_codes": 0}}}
    return BuiltIds(item_codes_table(items, token_ids, pieces, text=texts), [], stats)
