"""model.new_token_init=collab: new token rows carry the collaborative vectors' geometry (a seeded orthonormal
projection keeps their centred dot products), tokens without a vector keep the mean init, and the same seed gives
the same rows."""

from __future__ import annotations

import numpy as np
import torch

from trainers import models


def _rows(vectors, seed=0, tokens=("<item_0>", "<item_1>", "<item_2>", "<item_3>", "<item_4>")):
    model, tokenizer = models.tiny(list(tokens), hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                                   new_token_init="collab", token_vectors=vectors, new_token_noise=0.0, seed=seed)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    return model.get_input_embeddings().weight[ids].detach(), model.get_input_embeddings().weight[:ids[0]].detach()


def _cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_collaborative_rows_keep_the_vectors_geometry():
    rng = np.random.default_rng(3)
    vectors = {f"<item_{i}>": rng.normal(size=16).astype(np.float32) for i in range(4)}  # <item_4> has none
    rows, old = _rows(vectors)
    mean = old.float().mean(dim=0)
    given = np.stack([vectors[f"<item_{i}>"] for i in range(4)])
    given -= given.mean(axis=0)
    np.testing.assert_allclose(_cosines((rows[:4] - mean).numpy()), _cosines(given), atol=1e-4)
    torch.testing.assert_close(rows[4], mean)  # no vector, no noise: the mean of the old rows
    spread = (rows[:4] - mean).std(dim=0).mean() / old.float().std(dim=0).mean()
    assert 0.5 < float(spread) < 2.0  # on the scale of the existing rows
    again, _ = _rows(vectors)
    torch.testing.assert_close(rows, again)
    other, _ = _rows(vectors, seed=1)
    assert not torch.allclose(rows[:4], other[:4])


def test_vectors_wider_than_the_model_are_projected_down():
    rng = np.random.default_rng(4)
    vectors = {f"<item_{i}>": rng.normal(size=96).astype(np.float32) for i in range(5)}
    rows, old = _rows(vectors)
    assert rows.shape == (5, 64) and torch.isfinite(rows).all()
    assert len({tuple(r.tolist()) for r in rows}) == 5
