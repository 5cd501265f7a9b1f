"""The multinomial item head (CLLM4Rec scorer): one softmax over item tokens at the answer position, on tiny and on
each family's tiny random model."""

from __future__ import annotations

import pytest
import torch

from ranking.multinomial_head import multinomial_topk
from tests.tiny_families import FAMILIES, random_family_model
from trainers.models import tiny


def test_topk_is_the_softmax_ranking_over_item_tokens_and_skips_seen():
    items = [f"<item_{i}>" for i in range(30)]
    model, tok = tiny(items, seed=3)
    model.eval()
    item_ids = torch.tensor(tok.convert_tokens_to_ids(items))
    prompts = [tok("the user bought <item_3> <item_7>\nAnswer: ")["input_ids"], tok("hello\nAnswer: ")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    idx, scores = multinomial_topk(model, ids, mask, item_ids, top_k=5)
    for r, p in enumerate(prompts):  # each row equals an unpadded forward pass of that prompt alone
        with torch.no_grad():
            logits = model(torch.tensor([p])).logits[0, -1, item_ids]
        expect = torch.log_softmax(logits, -1).topk(5)
        assert idx[r].tolist() == expect.indices.tolist()
        assert torch.allclose(scores[r], expect.values, atol=1e-5)
    seen = [[int(idx[0, 0]), int(idx[0, 1])], []]
    idx2, _ = multinomial_topk(model, ids, mask, item_ids, top_k=5, seen=seen)
    assert not set(idx2[0].tolist()) & set(seen[0]) and idx2[0].tolist() == idx[0, 2:].tolist() + idx2[0, 3:].tolist()
    assert idx2[1].tolist() == idx[1].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_scores_left_padded_prompts_as_alone(family):
    """The head runs the model's own forward: left padding, Qwen2's qkv bias, Qwen3's q/k norms and the sliding
    windows (shorter than the longest prompt here) leave every row equal to that prompt's unpadded pass."""
    model = random_family_model(family, 96, seed=1, initializer_range=0.3, pad_token_id=0)
    item_ids = torch.arange(64, 96)
    prompts = [[1, 5, 9, 11, 40, 6, 7, 8, 9, 10, 70], [1, 7], [1, 3, 3, 3, 3, 3, 3, 20]]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    idx, scores = multinomial_topk(model, ids, mask, item_ids, top_k=6)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            expect = torch.log_softmax(model(torch.tensor([p])).logits[0, -1, item_ids], -1).topk(6)
        assert idx[r].tolist() == expect.indices.tolist()
        torch.testing.assert_close(scores[r], expect.values, rtol=0, atol=1e-5)
