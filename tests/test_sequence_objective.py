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
