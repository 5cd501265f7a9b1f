"""ControlRec and CLLM4Rec losses on tiny examples worked out by hand: values, and gradients that reach only
what they should."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.packing import IGNORE, Packer, TokenizedSample, tokenize_sample
from trainers.recipes.contrastive_losses import (contrastive_ce, hfm_loss, icl_loss, icl_weight, in_batch_candidates,
                                                 mean_pool)
from trainers.recipes.restricted_softmax import mutual_regularization, restricted_lm_loss
from trainers.recipes.visibility import (EntityIndex, InteractionGraph, item_key, token_entities,
                                         tokenize_with_entities, user_key, visibility_mask,
                                         visibility_mask_mod)


def test_contrastive_ce_by_hand():
    # cos(a, pos) = 1, cos(a, neg) = 0, T = 1: -log(e / (e + 1)) = log(1 + e^-1)
    loss = contrastive_ce(torch.tensor([[1.0, 0.0]]), torch.tensor([[[2.0, 0.0], [0.0, 3.0]]]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_in_batch_candidates_put_the_positive_first():
    x = torch.arange(3.0).unsqueeze(-1)
    assert in_batch_candidates(x).squeeze(-1).tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_hfm_loss_is_the_sum_of_both_terms_by_hand():
    e = torch.eye(2)
    ids = e.clone().requires_grad_(True)
    desc = e.clone().requires_grad_(True)
    history = e.clone().requires_grad_(True)
    nxt = e.flip(0).clone().requires_grad_(True)  # each history points at the *other* description
    loss, parts = hfm_loss(ids, desc, history, nxt, temperature=1.0)
    matched, mismatched = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))
    assert parts["hfm/item_description"] == pytest.approx(matched, abs=1e-6)
    assert parts["hfm/sequence_prediction"] == pytest.approx(mismatched, abs=1e-6)
    assert loss.item() == pytest.approx(matched + mismatched, abs=1e-6)
    loss.backward()
    for t in (ids, desc, history, nxt):  # both sides of both matches are encoded by the LM: all train
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_icl_loss_by_hand():
    a, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    n = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    logits = [1 / math.sqrt(2) / 0.5, 0.0, -1 / 0.5]
    expected = -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert icl_loss(a, p, n, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_icl_weight_grows_linearly_to_one():
    assert [icl_weight(t, 100, 0.1) for t in (0, 50, 100, 150)] == pytest.approx([0.1, 0.55, 1.0, 1.0])


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_restricted_softmax_by_hand_and_gradients_stay_inside_the_subset():
    vocab = 5
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0])  # predicts position 1 (task 0, restricted to {3, 4})
    logits[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # predicts position 2 (task 0, EOS=0 not allowed)
    logits[0, 2] = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0])  # predicts position 3 (task 1, full vocabulary)
    logits.requires_grad_(True)
    labels = torch.tensor([[IGNORE, 4, 0, 2]])
    tasks = torch.tensor([[-1, 0, 0, 1]])
    loss, per_task = restricted_lm_loss(logits, labels, tasks, 2, {0: torch.tensor([3, 4])})
    restricted = -(1.0 - math.log(math.exp(3.0) + math.exp(1.0)))
    full = -(0.0 - math.log(math.exp(0.5) + 4))
    assert loss.item() == pytest.approx((restricted + full) / 2, abs=1e-6)
    assert per_task[:, 1].tolist() == [1, 1]  # the EOS of the item-only text is not scored
    loss.backward()
    g = logits.grad[0]
    assert g[0, [0, 1, 2]].abs().sum() == 0 and g[0, [3, 4]].abs().sum() > 0
    assert g[1].abs().sum() == 0  # unscored label: no gradient at all
    assert g[2].abs().sum() > 0


def test_restricted_softmax_without_restrictions_equals_plain_cross_entropy():
    from trainers.sft_objective import packed_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 7)
    labels = torch.randint(0, 7, (2, 6))
    labels[:, :2] = IGNORE
    tasks = torch.where(labels == IGNORE, -1, torch.randint(0, 3, (2, 6)))
    a, pa_ = restricted_lm_loss(logits, labels, tasks, 3, {})
    b, pb = packed_lm_loss(logits, labels, tasks, 3)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert pa_ == pytest.approx(pb)


def test_mutual_regularization_by_hand_and_only_the_pair_rows_get_gradients():
    emb = torch.nn.Embedding(6, 2)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[0.0, 0], [1, 2], [5, 5], [4, 6], [9, 9], [7, 7]]))
    partner = torch.tensor([-1, 3, -1, -1, -1, -1])  # token 1 (<item_0>) <-> token 3 (<text_item_0>)
    reg = mutual_regularization(emb, torch.tensor([[0, 3, 2]]), partner, weight=2.0)  # only the twin appears
    assert reg.item() == pytest.approx(0.5 * 2.0 * ((1 - 4) ** 2 + (2 - 6) ** 2))
    reg.backward()
    touched = emb.weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [1, 3]
    assert mutual_regularization(emb, torch.tensor([[0, 2]]), partner, 2.0).item() == 0.0


# ------------------------------------------------------------------------------------- visibility matrix

def test_interaction_graph_relations():
    g = InteractionGraph([[0, 1, 2], [3]], users=[7, 8], window=0)
    assert g.related(item_key(0), item_key(2)) and g.related(user_key(7), item_key(1))
    assert not g.related(item_key(0), item_key(3)) and not g.related(user_key(8), item_key(0))
    assert not g.related(user_key(7), user_key(8))
    near = InteractionGraph([[0, 1, 2]], users=[7], window=1)
    assert near.related(item_key(0), item_key(1)) and not near.related(item_key(0), item_key(2))


def test_visibility_mask_by_hand():
    g = InteractionGraph([[0, 1]], users=[0])  # items 0 and 1 related; item 2 related to nothing
    # row: text, item0, item0, item1, item2, text | next packed sample: text, item2
    ent = torch.tensor([[0, 1, 1, 2, 3, 0, 0, 3]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1]])
    mask = visibility_mask(pos, ent, g, torch.float32)[0, 0]
    visible = mask == 0
    assert visible[2, 1] and visible[3, 1] and visible[3, 2]  # same ID; related IDs
    assert not visible[4, 1] and not visible[4, 2] and not visible[4, 3]  # item2 sees no other ID
    assert visible[4, 0] and visible[4, 4] and visible[5, 4] and visible[5, 1]  # text is untouched
    assert not visible[1, 2]  # causal
    assert not visible[6, 5] and not visible[7, 4] and visible[7, 6]  # packed samples stay apart
    assert mask[4, 1].item() == torch.finfo(torch.float32).min


def test_flex_mask_mod_equals_the_sdpa_mask_on_random_packed_rows():
    """The FlexAttention form (per-token tensors + relation table) allows exactly what the dense mask allows,
    on rows with different numbers of samples and IDs (the relation tables are padded to the widest row)."""
    from torch.nn.attention.flex_attention import create_mask

    gen = torch.Generator().manual_seed(3)
    g = InteractionGraph([[0, 1, 2], [2, 3], [5, 6, 7, 8]], users=[0, 1, 2])
    rows, length = 3, 48
    pos = torch.cat([torch.cat([torch.arange(n) for n in (10, 7, 20, 11)]).view(1, -1),
                     torch.cat([torch.arange(n) for n in (30, 18)]).view(1, -1),
                     torch.arange(length).view(1, -1)])
    ent = torch.randint(0, 10, (rows, length), generator=gen)
    ent[2] = 0  # a row of text only
    ent[ent > 0] = ent[ent > 0] - 1  # keys 1..9 -> item keys of items 0..8, and more text
    dense = visibility_mask(pos, ent, g, torch.float32)[:, 0] == 0
    flex = create_mask(visibility_mask_mod(pos, ent, g), rows, None, length, length, device="cpu")[:, 0]
    assert torch.equal(flex, dense)
    padded = visibility_mask_mod(pos, ent, g, table_size=length + 1)  # fixed shapes for a compiled kernel
    assert torch.equal(create_mask(padded, rows, None, length, length, device="cpu")[:, 0], dense)
    segment = (pos == 0).cumsum(-1)
    packed_causal = torch.ones(length, length, dtype=torch.bool).tril() & (segment[:, :, None] == segment[:, None, :])
    assert (packed_causal & ~dense)[:2].any()  # unrelated IDs really are hidden from each other
    assert dense[2].equal(packed_causal[2])


def test_visibility_mask_really_blocks_attention_in_hf_llama():
    """Changing an unrelated item's tokens must not move the hidden state at another item's tokens."""
    from trainers.models import tiny

    model, tok = tiny(attn_implementation="sdpa", seed=0)
    model.eval()
    g = InteractionGraph([[0, 1]], users=[0])
    ids = torch.tensor([[5, 60, 61, 62, 63, 7, 8]])
    pos = torch.arange(7).unsqueeze(0)
    ent = torch.tensor([[0, 1, 1, 3, 3, 0, 0]])  # item0 at 1-2, item2 (unrelated) at 3-4
    changed = ids.clone()
    changed[0, 1:3] = torch.tensor([90, 91])
    with torch.no_grad():
        m = visibility_mask(pos, ent, g, torch.float32)
        a = model(input_ids=ids, position_ids=pos, attention_mask=m, output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=changed, position_ids=pos, attention_mask=m, output_hidden_states=True).hidden_states[-1]
        c = model(input_ids=changed, position_ids=pos, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(a[0, 3:5], b[0, 3:5], atol=1e-6)  # item2 never saw item0 (in any layer)
    assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-4)  # text after them did
    assert not torch.allclose(a[0, 3:5], c[0, 3:5], atol=1e-4)  # without the mask it would have


def test_token_entities_follow_offsets():
    spans = [(4, 13, item_key(1471))]
    offsets = [(0, 3), (3, 8), (8, 9), (9, 13), (13, 14)]
    assert token_entities(offsets, spans) == [0, item_key(1471), item_key(1471), item_key(1471), 0]


def test_tokenize_with_entities_matches_plain_tokenization():
    from trainers.models import TINY_TOKENIZER_DIR
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    index = EntityIndex([f"item_{i}" for i in range(2000)])
    prompt, response = "History: item_1471, item_23 and item_9. Next?", "item_1999"
    for seq_len in (64, 12):
        ids, n_prompt, ents = tokenize_with_entities(tok, prompt, response, seq_len, index)
        assert (ids, n_prompt) == tokenize_sample(tok, prompt, response, seq_len)
        assert len(ents) == len(ids)
    ids, n_prompt, ents = tokenize_with_entities(tok, prompt, response, 64, index)
    named = {k for k in ents if k}
    assert named == {item_key(1471), item_key(23), item_key(9), item_key(1999)}
    pieces = [tok.decode([t]) for t, k in zip(ids, ents) if k == item_key(1471)]
    assert "".join(pieces).strip() == "item_1471"
    # a user_sequence sample: unframed, and cut to its most recent items, as the sequence objective reads it
    sequence = ", ".join(f"item_{i}" for i in range(1990, 2000))
    for seq_len in (128, 16):
        ids, n_prompt, ents = tokenize_with_entities(tok, "", sequence, seq_len, index, "user_sequence")
        assert (ids, n_prompt) == tokenize_sample(tok, "", sequence, seq_len, "user_sequence")
        assert len(ents) == len(ids) and ents[-2] == item_key(1999)  # the last item, before EOS


def test_packer_carries_entities_and_keeps_them_on_resume():
    packer = Packer(seq_len=8, rows=1, pad_id=0, lookahead=4)
    packer.add([TokenizedSample(1, 0, [1, 2, 3], 1, [0, 5, 5]), TokenizedSample(2, 0, [4, 5, 6, 7, 8], 2,
                                                                                 [0, 0, 0, 0, 0]),
                TokenizedSample(3, 0, [9, 9], 1, [6, 6])])
    restored = Packer(seq_len=8, rows=1, pad_id=0, lookahead=4)
    restored.load_state_dict(packer.state_dict())
    for p in (packer, restored):
        batch = p.build()
        assert batch.entity_ids[0].tolist() == [0, 5, 5, 0, 0, 0, 0, 0]


# ------------------------------------------------------------------------------ objectives on a tiny LLaMA

def _packed(tok, pairs, seq_len=48):
    packer = Packer(seq_len=seq_len, rows=2, pad_id=tok.eos_token_id, lookahead=8)
    packer.add(TokenizedSample(i, task, *tokenize_sample(tok, p, r, seq_len)) for i, (task, p, r) in enumerate(pairs))
    return packer.build()


def test_cllm4rec_objective_scores_only_labelled_positions_like_the_full_logits():
    from trainers.models import tiny
    from trainers.recipes.config import CLLM4RecConfig
    from trainers.recipes.objectives import CLLM4RecObjective

    items = [f"<item_{i}>" for i in range(6)]
    new = items + ["<user_0>"] + [f"<text_item_{i}>" for i in range(6)] + ["<text_user_0>"]
    model, tok = tiny(new, seed=0)
    tasks = ["sequential", "collaborative_lm", "content_lm"]
    batch = _packed(tok, [(0, "user <user_0> had <item_1>, <item_2>. Next?", "<item_3>"),
                          (1, "user <user_0> has interacted with", "<item_1><item_2><item_3>"),
                          (2, "Describe item <text_item_4>.", "A blue widget.")])
    objective = CLLM4RecObjective(3, CLLM4RecConfig(mutual_regularization=0.5), tasks, tok, new, items)
    loss, per_task, extras = objective.loss(model, batch, 0, "cpu")
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    expected, expected_tasks = restricted_lm_loss(logits, batch.labels, batch.task_ids, 3, objective.restrictions)
    reg = mutual_regularization(model.get_input_embeddings(), batch.input_ids, objective.partner, 0.5)
    assert loss.item() == pytest.approx(expected.item() + reg.item(), rel=1e-4)
    assert per_task == pytest.approx(expected_tasks, rel=1e-3)
    assert per_task[0, 1] == 1 and per_task[1, 1] == 3  # one item answer; three item tokens, EOS unscored
    assert extras["mutual_regularization"] == pytest.approx(reg.item())
    assert reg.item() > 0  # <item_1..4> and <text_item_4> start from different noise


def test_cllm4rec_multinomial_head_scores_every_item_of_a_user_sequence_over_the_item_tokens():
    """Sequence-level CLLM4Rec: the user_sequence task's items are all targets of the multinomial head (a softmax
    over the item tokens only), its closing EOS unscored, as the sequence objective scores them."""
    import torch.nn.functional as F

    from trainers.models import tiny
    from trainers.recipes.config import CLLM4RecConfig
    from trainers.recipes.objectives import CLLM4RecObjective

    items = [f"<item_{i}>" for i in range(6)]
    model, tok = tiny(items, seed=0)
    batch = _packed(tok, [(0, "", "<item_1><item_4><item_2>")])
    objective = CLLM4RecObjective(1, CLLM4RecConfig(mutual_regularization=0.0), ["user_sequence"], tok, items, items)
    loss, per_task, _ = objective.loss(model, batch, 0, "cpu")
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
    ids = tok.convert_tokens_to_ids(items)
    row = batch.input_ids[0].tolist()
    targets = [p for p in range(1, len(row)) if row[p] in ids]  # positions holding an item token
    by_hand = torch.stack([-F.log_softmax(logits[p - 1, ids], -1)[ids.index(row[p])] for p in targets]).mean()
    assert per_task[0, 1] == 3 and loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_controlrec_objective_adds_both_contrastive_terms_with_the_schedule():
    from trainers.models import tiny
    from trainers.recipes.config import ControlRecConfig
    from trainers.recipes.controlrec_data import ControlRecData
    from trainers.recipes.objectives import ControlRecObjective, SFTObjective

    model, tok = tiny(attn_implementation="sdpa", seed=0)
    names = [f"item_{i}" for i in range(12)]
    data = ControlRecData(names, [f"widget number {i} in blue" for i in range(12)],
                          [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]], [2, 5, 7, 10], [0, 1, 2, 3], None, 0, 20)
    batch = _packed(tok, [(0, "History: item_0, item_1. Next?", "item_2"),
                          (0, "History: item_5, item_6. Next?", "item_7")])
    cfg = ControlRecConfig(hfm_negatives=3, icl_anchors=2, icl_negatives=2, visibility=False)
    objective = ControlRecObjective(1, cfg, data, tok, total_steps=10, seed=0, rank=0, attn_implementation="sdpa")
    sft, _, _ = SFTObjective(1).loss(model, batch, 0, "cpu")
    loss, _, extras = objective.loss(model, batch, 5, "cpu")
    assert extras["icl_weight"] == pytest.approx(0.1 + 0.9 * 0.5)
    expected = sft.item() + extras["hfm"] + extras["icl_weight"] * extras["icl"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert extras["hfm"] == pytest.approx(extras["hfm/item_description"] + extras["hfm/sequence_prediction"])
    with pytest.raises(ValueError, match="sdpa"):
        ControlRecObjective(1, ControlRecConfig(), data, tok, 10, 0, 0, "flash_attention_2")


def test_visibility_refuses_item_names_it_cannot_locate():
    from trainers.models import TINY_TOKENIZER_DIR
    from transformers import PreTrainedTokenizerFast

    from trainers.recipes.config import ControlRecConfig
    from trainers.recipes.controlrec_data import ControlRecData
    from trainers.recipes.objectives import ControlRecObjective

    tok = PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    semantic = [f"<a_{i}><b_{i}>" for i in range(4)]
    data = ControlRecData(semantic, ["x"] * 4, [[0], [1]], [1, 2], [0, 1], None, 0, 20)
    with pytest.raises(ValueError, match="subtoken or atomic"):
        ControlRecObjective(1, ControlRecConfig(), data, tok, 10, 0, 0, "sdpa")
