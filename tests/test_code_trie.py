"""The code trie against a plain set-of-tuples reference on random code sets (hypothesis), both mask paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking.code_trie import CodeTrie

VOCAB = 7


def _continuations(sequences: list[tuple[int, ...]], prefix: tuple[int, ...]) -> set[int]:
    return {s[len(prefix)] for s in sequences if len(s) > len(prefix) and s[:len(prefix)] == prefix}


fixed_length_sets = st.integers(1, 4).flatmap(
    lambda length: st.sets(st.tuples(*[st.integers(0, VOCAB - 1)] * length), min_size=1, max_size=40))
ragged_sets = st.sets(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5).map(tuple), min_size=1, max_size=40)


def _check_against_reference(trie: CodeTrie, sequences: list[tuple[int, ...]], items: list[int]) -> None:
    # Every inserted sequence is valid and names its own item, one at a time and batched.
    for seq, item in zip(sequences, items):
        assert trie.is_valid(list(seq)) and trie.item_of(list(seq)) == item
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(i)
    for length, rows in by_length.items():
        batch = torch.tensor([sequences[i] for i in rows])
        assert trie.item_of(batch).tolist() == [items[i] for i in rows]
    # Every prefix of every length (present or not) allows exactly its continuations.
    prefixes = {s[:k] for s in sequences for k in range(len(s) + 1)}
    prefixes |= {p[:-1] + ((p[-1] + 1) % VOCAB,) for p in prefixes if p}  # neighbours, mostly absent
    for length in {len(p) for p in prefixes}:
        group = sorted(p for p in prefixes if len(p) == length)
        masks = trie.allowed_next(torch.tensor(group, dtype=torch.long).reshape(len(group), length))
        assert masks.shape == (len(group), VOCAB)
        for prefix, mask in zip(group, masks):
            assert set(torch.nonzero(mask).flatten().tolist()) == _continuations(sequences, prefix), prefix
            if prefix:
                assert trie.is_valid(list(prefix)) == (prefix in set(sequences)), prefix


@settings(max_examples=60, deadline=None)
@given(fixed_length_sets, st.booleans())
def test_fixed_length_codes_match_reference(code_set, dense):
    sequences = sorted(code_set)
    items = [1000 + 3 * i for i in range(len(sequences))]
    trie = CodeTrie(sequences, items, vocab_size=VOCAB, dense_mask_limit=1 << 20 if dense else 0)
    _check_against_reference(trie, sequences, items)


@settings(max_examples=60, deadline=None)
@given(ragged_sets, st.booleans())
def test_ragged_codes_match_reference(code_set, dense):
    # Sequences may be prefixes of each other (as subtoken IDs are): the shorter one is still an item.
    sequences = sorted(code_set)
    items = list(range(len(sequences)))
    trie = CodeTrie(sequences, items, vocab_size=VOCAB, dense_mask_limit=1 << 20 if dense else 0)
    _check_against_reference(trie, sequences, items)


@settings(max_examples=30, deadline=None)
@given(ragged_sets)
def test_end_token_makes_ragged_codes_prefix_free(code_set):
    sequences = sorted(code_set)
    end = VOCAB
    trie = CodeTrie(sequences, vocab_size=VOCAB + 1, end_token=end)
    for i, seq in enumerate(sequences):
        assert trie.item_of(list(seq) + [end]) == i
        assert not trie.is_valid(list(seq))
        allowed = set(torch.nonzero(trie.allowed_next([list(seq)])[0]).flatten().tolist())
        assert end in allowed and allowed - {end} == _continuations(sequences, seq)


def test_incremental_steps_follow_the_walk():
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [2, 2, 2], [0, 3, 1]])
    trie = CodeTrie(codes, vocab_size=4)
    nodes = torch.zeros(4, dtype=torch.long)
    for depth in range(3):
        allowed = trie.allowed_next_from_nodes(depth, nodes)
        assert allowed[torch.arange(4), codes[:, depth]].all()
        nodes = trie.step(depth, nodes, codes[:, depth])
        assert torch.equal(nodes, trie.walk(codes[:, :depth + 1]))
    assert trie.terminal_items[3][nodes].tolist() == [0, 1, 2, 3]
    assert trie.step(0, torch.tensor([0]), torch.tensor([1])).tolist() == [-1]
    assert not trie.allowed_next_from_nodes(1, torch.tensor([-1])).any()


def test_shared_sequence_is_an_error_naming_both_items():
    with pytest.raises(ValueError, match=r"items \[5, 9\] share the code sequence \[1, 2\]"):
        CodeTrie([[1, 2], [1, 3], [1, 2]], items=[5, 7, 9], vocab_size=4)
