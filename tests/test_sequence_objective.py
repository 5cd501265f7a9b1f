"""The sequence-level ID objective: its loss against cross-entropy summed by hand, the per-level restricted
softmax's gradient, the ID groups of each scheme, the user_sequence samples and the prompt format they share
with inference, and checkpoint selection on the valid score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.recipes.restricted_softmax import grouped_token_loss, token_groups


class _Vocab:
    """A tokenizer stand-in for token_groups: it only maps token strings to ids."""

    def __init__(self, tokens):
        self.ids = {t: i for i, t in enumerate(tokens)}

    def convert_tokens_to_ids(self, tokens):
        return [self.ids[t] for t in tokens]


def test_sequence_loss_equals_per_position_cross_entropy_by_hand():
    # vocabulary: 0..3 text, 4..7 item tokens, 8 EOS; task 0 = user_sequence, task 1 = another task
    torch.manual_seed(0)
    vocab = 9
    group_of = torch.full((vocab,), -1)
    group_of[4:8] = 0
    groups = [torch.arange(4, 8)]
    pred = torch.randn(6, vocab)
    target = torch.tensor([5, 7, 4, 8, 2, 6])  # the EOS label (8) of the sequence task is not scored
    tasks = torch.tensor([0, 0, 0, 0, 1, 1])
    loss, per_task = grouped_token_loss(pred, target, tasks, 2, 0, group_of, groups)
    by_hand = []
    for row in range(3):  # softmax over the item tokens only
        logits = pred[row, 4:8]
        by_hand.append(-(logits[target[row] - 4] - torch.logsumexp(logits, 0)))
    for row in (4, 5):  # full vocabulary for the other task
        by_hand.append(-(pred[row, target[row]] - torch.logsumexp(pred[row], 0)))
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    assert per_task[0, 1] == 3 and per_task[1, 1] == 2
    assert per_task[0, 0] == pytest.approx(torch.stack(by_hand[:3]).sum().item(), rel=1e-6)


def test_per_level_softmax_gives_zero_gradient_outside_the_level():
    # semantic codes: level 0 = tokens 2..4, level 1 = tokens 5..7
    tokens = ["a", "b", "<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>", "</s>"]
    group_of, groups = token_groups(_Vocab(tokens), [["<a_0>", "<b_1>"], ["<a_2>", "<b_0>"]], len(tokens))
    assert [g.tolist() for g in groups] == [[2, 4], [5, 6]]  # only the codes items use
    pred = torch.randn(2, len(tokens), requires_grad=True)
    loss, _ = grouped_token_loss(pred, torch.tensor([4, 6]), torch.tensor([0, 0]), 1, 0, group_of, groups)
    loss.backward()
    grad = pred.grad
    assert torch.count_nonzero(grad[0, [2, 4]]) == 2 and torch.count_nonzero(grad[1, [5, 6]]) == 2
    outside0 = [i for i in range(len(tokens)) if i not in (2, 4)]
    outside1 = [i for i in range(len(tokens)) if i not in (5, 6)]
    assert torch.all(grad[0, outside0] == 0) and torch.all(grad[1, outside1] == 0)


def test_trie_softmax_scores_each_code_over_its_prefix_children_by_hand():
    """train.sequence.item_softmax=trie: a code is scored against the children of its item's prefix only; a
    node with one child scores 0 with no gradient; a code whose prefix is not in the batch (a sequence cut
    mid-item) keeps its level's softmax; other tasks keep the whole vocabulary."""
    from ranking.code_trie import CodeTrie

    # items: (1, 4), (1, 5), (2, 6); level 0 = tokens 1-2, level 1 = tokens 4-6; 9 = EOS, 0 = text
    trie = CodeTrie([[1, 4], [1, 5], [2, 6]], vocab_size=10)
    group_of = torch.full((10,), -1)
    group_of[[1, 2]] = 0
    group_of[[4, 5, 6]] = 1
    groups = [torch.tensor([1, 2]), torch.tensor([4, 5, 6])]
    torch.manual_seed(0)
    pred = torch.randn(8, 10, requires_grad=True)
    # task 0 = user_sequence: a cut item's second code (5), then items (1, 4), (2, 6), EOS; task 1: text
    target = torch.tensor([5, 1, 4, 2, 6, 9, 0, 3])
    tasks = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    loss, per_task = grouped_token_loss(pred, target, tasks, 2, 0, group_of, groups, trie)

    def nll(row, allowed, token):
        logits = pred[row, allowed]
        return -(logits[allowed.index(token)] - torch.logsumexp(logits, 0))

    sequence = [nll(0, [4, 5, 6], 5), nll(1, [1, 2], 1), nll(2, [4, 5], 4), nll(3, [1, 2], 2), torch.tensor(0.0)]
    other = [nll(6, list(range(10)), 0), nll(7, list(range(10)), 3)]
    assert loss.item() == pytest.approx(torch.stack(sequence + other).mean().item(), rel=1e-6)
    assert per_task[0, 1] == 5 and per_task[1, 1] == 2
    assert per_task[0, 0] == pytest.approx(torch.stack(sequence).sum().item(), rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[4] == 0)  # (2, 6): 2 has one child, nothing to learn
    assert torch.all(pred.grad[2, [0, 1, 2, 3, 6, 7, 8, 9]] == 0)  # only 1's children, 4 and 5
    assert torch.count_nonzero(pred.grad[0, [4, 5, 6]]) == 3  # the cut item: its whole level


def test_flat_item_loss_scores_whole_items_by_the_sum_of_their_code_rows_by_hand():
    """train.sequence.item_loss: each position that predicts an item's first code also scores every item by the
    state times the sum of its code rows; an item cut by the row's end, a gap in the positions, another task's
    labels and an unknown code tuple are left out."""
    from trainers.recipes.item_level_loss import ItemCodeIndex, item_level_loss, item_starts

    # items: (1, 4), (1, 5), (2, 6); level 0 = tokens 1-2, level 1 = tokens 4-6; 9 = EOS
    groups = [torch.tensor([1, 2]), torch.tensor([4, 5, 6])]
    group_of = torch.full((10,), -1)
    group_of[[1, 2]] = 0
    group_of[[4, 5, 6]] = 1
    items = ItemCodeIndex.build(torch.tensor([[1, 4], [1, 5], [2, 6]]), groups, 10)
    assert items.rows(torch.tensor([[2, 6], [1, 5], [1, 4], [2, 4]])).tolist() == [2, 1, 0, -1]
    # labels: (2, 6) (1, 5) EOS | (1, [gap] 4) | (2, 4): no such item | task 1's (1, 4) | a cut (1,
    index = torch.tensor([0, 1, 2, 3, 4, 10, 12, 13, 14, 15, 16, 20])
    target = torch.tensor([2, 6, 1, 5, 9, 1, 4, 2, 4, 1, 4, 1])
    tasks = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    level = torch.where(tasks == 0, group_of[target], -1)
    starts, rows = item_starts(index, target, level, items)
    assert starts.tolist() == [0, 2] and rows.tolist() == [2, 1]
    torch.manual_seed(0)
    embed = torch.randn(10, 3)
    states = torch.randn(12, 3)
    vectors = embed[items.code_ids].sum(1)
    by_hand = []
    for at, row in zip(starts.tolist(), rows.tolist()):
        logits = torch.stack([states[at] @ (embed[a] + embed[b]) for a, b in ([1, 4], [1, 5], [2, 6])])
        by_hand.append(-(logits[row] - torch.logsumexp(logits, 0)))
    assert item_level_loss(states[starts], rows, vectors).item() == pytest.approx(torch.stack(by_hand).mean().item(),
                                                                                   rel=1e-5)


def test_subtoken_ids_have_no_groups_and_score_the_whole_vocabulary():
    group_of, groups = token_groups(_Vocab(["a"]), [], 5)
    assert groups == [] and torch.all(group_of == -1)
    pred = torch.randn(2, 5)
    target = torch.tensor([1, 4])
    loss, _ = grouped_token_loss(pred, target, torch.tensor([0, 0]), 1, 0, group_of, groups)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(pred, target).item(), rel=1e-6)


def test_user_sequence_samples_and_the_inference_prompt_read_the_same_tokens():
    from transformers import AutoTokenizer

    from data_pipeline.samples.prompt_format import PromptFormat, format_for_task
    from data_pipeline.samples.tasks import SequenceRows, user_sequence_samples
    from trainers.models import TINY_TOKENIZER_DIR

    names = [f"<item_{i}>" for i in range(6)]
    rows = SequenceRows(np.array([0, 0, 1]), [[1], [1, 2], [5]], np.array([2, 3, 4]))
    samples = user_sequence_samples(rows, names, max_items=2)
    assert samples.prompts == ["", ""] and samples.responses == ["<item_2><item_3>", "<item_5><item_4>"]
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tok.add_tokens(names, special_tokens=True)
    ids, prompt_len = format_for_task("user_sequence").sample_ids(tok, "", samples.responses[0], 64)
    items = tok.convert_tokens_to_ids(["<item_2>", "<item_3>"])
    assert ids == [tok.bos_token_id, *items, tok.eos_token_id] and prompt_len == 1
    # inference reads the history in the same format: the model continues exactly where training predicted
    fmt = PromptFormat("sequence", max_history=2)
    assert fmt.prompt_ids(tok, ["<item_2><item_3>"]) == [ids[:-1]]
    # a sequence longer than the row keeps its most recent items
    long_ids, _ = format_for_task("user_sequence").sample_ids(tok, "", "".join(names), 5)
    assert long_ids == [tok.bos_token_id, *tok.convert_tokens_to_ids(["<item_4>", "<item_5>"]), tok.eos_token_id]


def test_checkpoint_selection_keeps_the_best_valid_round_and_stops_on_patience(tmp_path):
    from trainers.best_checkpoint import BestCheckpoint, read_best
    from trainers.validation import VALID_METRIC

    best = BestCheckpoint(tmp_path / "best", patience=2)
    scores = {50: 0.02, 100: 0.05, 150: 0.04, 200: 0.05, 250: 0.01}
    for step, score in scores.items():
        if best.offer(step, {VALID_METRIC: score}):
            best.save({"w": torch.full((2,), float(step))}, rank=0, lora=False)
        if best.stopped:
            break
    assert best.step == 100 and step == 200  # the tie at 200 is no improvement; two bad rounds stop it
    kept = read_best(tmp_path / "best")
    assert kept["step"] == 100 and kept["metrics"][VALID_METRIC] == 0.05
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "best" / "weights.safetensors"))["w"].tolist() == [100.0, 100.0]
    resumed = BestCheckpoint(tmp_path / "best", patience=2, state=best.state())
    assert resumed.stopped and resumed.step == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_valid_sample_is_fixed_by_the_seed():
    from trainers.validation import valid_sample

    a, b = valid_sample(1000, 100, seed=3), valid_sample(1000, 100, seed=3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 100 and not np.array_equal(a, valid_sample(1000, 100, 4))
    assert np.array_equal(valid_sample(50, 0, 3), np.arange(50))


@pytest.mark.parametrize("objective, scheme, expected", [
    ("sequence", "semantic", "per_level"), ("sequence", "atomic", "per_level"), ("sequence", "subtoken", "vocabulary"),
    ("sft", "semantic", "vocabulary"), ("sequence", "semantic", "trie")])
def test_the_saved_prompt_format_tells_inference_what_the_item_softmax_was(objective, scheme, expected):
    """The sequence objective trains each code token against its level's tokens only, so inference and the valid
    rounds must normalise beam scores over the same tokens; a next-token objective trains against the vocabulary."""
    from launcher.config import load_config
    from trainers.ray_launch import item_softmax

    tasks = "[user_sequence]" if objective == "sequence" else "[sequential]"
    softmax = ["train.sequence.item_softmax=trie"] if expected == "trie" else []
    cfg = load_config(None, ["data.path=data/scientific", "data.name=Scientific", f"train.objective={objective}",
                             f"ids.scheme={scheme}", f"samples.tasks={tasks}"] + softmax)
    assert item_softmax(cfg) == expected


def test_flat_rerank_orders_beam_items_by_code_log_probability_plus_the_flat_logit_by_hand():
    """PromptFormat.item_rerank=flat (train.sequence.item_loss > 0): beam search's items are re-ordered by their
    beam score plus the prompt's last state times the sum of their code rows; padding (-1) stays last."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from ranking.topk_scorer import flat_rerank

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)  # flat logits of the beam scores' size
    code_token_ids = torch.tensor([[3, 6], [3, 7], [4, 8], [5, 9]])  # item_id r: codes row r
    prompts = [[1, 3, 6], [1, 4, 8, 3, 7]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    scorer = SimpleNamespace(model=model, code_token_ids=code_token_ids, _encode=lambda users, histories: (ids, mask))
    items = torch.tensor([[0, 2, 3, -1], [1, 3, 0, 2]])
    scores = torch.tensor([[-1.0, -1.1, -1.2, float("-inf")], [-0.5, -2.0, -2.1, -3.0]])
    ranked, combined = flat_rerank(scorer, None, None, items, scores)
    embed = model.get_input_embeddings().weight.detach()
    reordered = []
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        by_hand = {int(i): float(s) + float(last @ embed[code_token_ids[i]].sum(0))
                   for i, s in zip(items[row], scores[row]) if i >= 0}
        expected = sorted(by_hand, key=lambda i: -by_hand[i])
        reordered.append(expected != [int(i) for i in items[row] if i >= 0])
        assert ranked[row, :len(expected)].tolist() == expected
        assert combined[row, :len(expected)].tolist() == pytest.approx([by_hand[i] for i in expected], rel=1e-4)
    assert ranked[0, -1] == -1 and combined[0, -1] == float("-inf")
    assert any(reordered)  # the flat logit changed the beam's order somewhere, so the check above has teeth


def test_subtoken_sequences_prompt_and_trie_read_items_as_training_tokenised_them(tmp_path):
    """Sub-token IDs in the sequence style: a sample is its items' texts joined by ', ', tokenised as one text,
    where a BPE tokenizer moves the separator's space into the next item's first token. The inference prompt
    (history + separator) followed by the trie's tokens for the next item, then the trie's end token, must be
    exactly the tokens training saw."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from data_pipeline.samples.prompt_format import PromptFormat, format_for_task
    from ranking.user_prompts import PromptBuilder
    from tests.toy_run import stage, write_raw
    from trainers.models import TINY_TOKENIZER_DIR

    sequences = {str(u): [(7 * u + 3 * k) % 120 for k in range(5)] for u in range(40)}  # 1-3 digit item ids
    run_dir = tmp_path / "run"
    assert stage("prepare", run_dir, f"data.path={write_raw(tmp_path / 'raw', sequences)}", "data.name=Toy") == 0
    for command in ("build-ids", "build-samples"):
        assert stage(command, run_dir, "ids.scheme=subtoken", "ids.user_tokens=true", "infer.scorer=beam",
                     "samples.tasks=[user_sequence]") == 0
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    prompts = PromptBuilder(str(run_dir), 120, 40, 50, prompt_format=PromptFormat("sequence", 50))
    separator, item_tokens = prompts.joined_items(tok)
    assert prompts.joiner == ", " and item_tokens[17] != tok("item_17", add_special_tokens=False)["input_ids"]
    samples = pq.read_table(run_dir / "samples" / "train").to_pylist()
    names = {name: i for i, name in enumerate(prompts.item_names)}
    checked = 0
    for sample in samples[:20]:
        items = [names[n] for n in sample["response"].split(", ")]
        ids, _ = format_for_task("user_sequence").sample_ids(tok, "", sample["response"], 512)
        prompt = prompts.prompt_ids(tok, [0], [items[:-1]])[0]
        assert prompt + item_tokens[items[-1]] + [tok.eos_token_id] == ids
        if len(items) > 2:  # mid-sequence an item ends where the separator (the trie's end token) starts
            inner = prompts.prompt_ids(tok, [0], [items[:-2]])[0] + item_tokens[items[-2]] + [separator[0]]
            assert ids[:len(inner)] == inner
            checked += 1
    assert checked
