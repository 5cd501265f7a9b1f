"""The subtoken scheme (ControlRec): an item's ID written as text, item_1471, and split by the LM's own tokenizer.

No tokens are added; codes are the tokenizer ids of the text (no special tokens). The codes vary in length
and one can be a prefix of another (item_5 / item_51), so a trie over them needs an end token.

Which number an item gets is ``ids.subtoken_numbers``: ``catalogue`` writes its dense id; ``collaborative``
numbers the items in the depth-first order of a hierarchical k-means tree over the baseline's item vectors, so
items SASRec puts close together get neighbouring numbers and share their leading digits (the collaborative
indexing of Hua et al., "How to Index Item IDs for Recommendation Foundation Models", 2023). A catalogue number
carries nothing the model can generalise from: item_1471 and item_1472 are unrelated.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_pipeline.item_ids.item_codes import BuiltIds, item_codes_table

BRANCHING = 10
"""Children per node of the numbering tree: one per leading digit."""


def item_text(number: int) -> str:
    return f"item_{number}"


def collaborative_order(vectors: np.ndarray, seed: int, branching: int = BRANCHING) -> np.ndarray:
    """Item ids in the depth-first order of a k-means tree (``branching`` children a node, scikit-learn k-means
    seeded by ``seed``) over ``vectors``; a node of at most ``branching`` items keeps id order. A node's children
    follow the leaf order of a Ward tree over their centres, so where k-means splits one group of alike items
    in two, the halves still get neighbouring numbers."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from sklearn.cluster import KMeans

    vectors = np.asarray(vectors, np.float64)
    order: list[int] = []
    stack = [np.arange(len(vectors))]
    while stack:
        node = stack.pop()
        if len(node) <= branching:
            order.extend(node.tolist())
            continue
        labels = KMeans(n_clusters=branching, n_init=1, max_iter=50, random_state=seed).fit_predict(vectors[node])
        children = [node[labels == c] for c in range(branching) if (labels == c).any()]
        if len(children) == 1:  # identical vectors: k-means cannot split them, id order does
            children = np.array_split(node, branching)
        centres = np.stack([vectors[c].mean(0) for c in children])
        children = [children[c] for c in leaves_list(linkage(centres, "ward", optimal_ordering=True))]
        stack.extend(reversed(children))  # popped in that order
    return np.asarray(order, np.int64)


def item_numbers(order: np.ndarray) -> np.ndarray:
    """Per item id, its number: the rank in ``order`` offset so every number has the same count of digits
    (4,344 items -> 1000..5343), so no item's digits are a prefix of another's."""
    n = len(order)
    digits = len(str(max(n - 1, 0)))
    start = 10 ** (digits - 1) if n <= 9 * 10 ** (digits - 1) else 10 ** digits
    numbers = np.empty(n, np.int64)
    numbers[order] = start + np.arange(n)
    return numbers


def build_subtoken_ids(items: pa.Table, tokenizer, vectors: np.ndarray | None = None, seed: int = 0) -> BuiltIds:
    """``tokenizer``: a Hugging Face tokenizer (called with add_special_tokens=False). ``vectors`` (one row per
    item, in item id order) number the items collaboratively; without them each item is named by its id."""
    ids = items.column("item_id").to_pylist()
    numbers = ids if vectors is None else item_numbers(collaborative_order(vectors, seed))[ids].tolist()
    texts = [item_text(n) for n in numbers]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.convert_ids_to_tokens(t) for t in token_ids]
    lengths = [len(t) for t in token_ids]
    distinct = len({tuple(t) for t in token_ids})
    if distinct < len(texts):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} maps {len(texts) - distinct} item "
                         "texts onto another item's token ids; use a tokenizer without unknown-token fallbacks")
    stats = {"tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
             "numbers": "catalogue" if vectors is None else "collaborative",
             "tokens_per_item": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                                 "mean": sum(lengths) / max(1, len(lengths))},
             "collisions": {"before": {"duplicate_codes": 0}, "after": {"duplicate_codes": 0}}}
    return BuiltIds(item_codes_table(items, token_ids, pieces, text=texts), [], stats)
