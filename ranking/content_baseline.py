"""The content baseline of the evaluation: TF-IDF (scikit-learn) over each item's text, the user's recent history as
the query. It reads no interaction beyond the user's own history, so it ranks new items as well as old ones: the
reader's measure of what item text alone does. `recllm evaluate` scores it beside recllm, SASRec and most-popular
whenever the dataset has text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from data_pipeline.item_ids.text_vectors import item_documents  # noqa: F401  (the baseline's documents)


def tfidf_item_vectors(documents: Sequence[str]) -> sp.csr_matrix:
    """[items, vocabulary] L2-normalised TF-IDF rows (sublinear tf, English stop words, unigrams and bigrams);
    an item with no text gets a zero row."""
    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", ngram_range=(1, 2), min_df=1,
                                 dtype=np.float32)
    return vectorizer.fit_transform(documents).tocsr()


def recent_history_queries(histories: Sequence[Sequence[int]], num_items: int, recent: int) -> sp.csr_matrix:
    """[users, items] weights: 1/n on each of the user's last ``n = min(recent, len)`` history items."""
    rows, cols, vals = [], [], []
    for r, history in enumerate(histories):
        last = list(history)[-recent:]
        rows += [r] * len(last)
        cols += last
        vals += [1.0 / len(last)] * len(last)
    return sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(len(histories), num_items))


def content_topk(item_vectors: sp.csr_matrix, histories: Sequence[Sequence[int]], k: int, recent: int = 5,
                 exclude_seen: bool = True, batch_size: int = 1024) -> np.ndarray:
    """[users, k] item ids, best first: cosine of each item's vector with the mean vector of the user's last
    ``recent`` history items (the same order every run for the same input). History items are left out when
    ``exclude_seen``."""
    num_items = item_vectors.shape[0]
    k = min(k, num_items)
    out = np.empty((len(histories), k), dtype=np.int64)
    norms = np.sqrt(item_vectors.multiply(item_vectors).sum(1)).A1
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        query = recent_history_queries(chunk, num_items, recent) @ item_vectors
        query_norm = np.sqrt(query.multiply(query).sum(1)).A1
        scores = (query @ item_vectors.T).toarray()
        scores /= np.maximum(query_norm[:, None] * norms[None, :], 1e-12)
        if exclude_seen:
            for r, history in enumerate(chunk):
                scores[r, list(history)] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < num_items else np.tile(np.arange(num_items),
                                                                                           (len(chunk), 1))
        part.sort(axis=1)
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        out[start:start + len(chunk)] = np.take_along_axis(part, order, 1)
    return out
