"""Constrained beam search: the fast version against the plain reference and against brute force on random tiny
LLaMAs and random code tries (hypothesis), and on each family's tiny model (Llama 3, Qwen2, Qwen3, Mistral);
padding, generation settings, Hugging Face's beam search, and the token trie built from an item_ids/ folder."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from data_pipeline.item_ids.item_codes import ITEM_CODES_FILE, item_codes_table, semantic_token, semantic_vocabulary
from ranking.beam_decoders import CopiedCacheDecoder, SharedPromptDecoder, decoder_for
from ranking.code_trie import CodeTrie
from ranking.constrained_beam_search import (build_token_trie, constrained_beam_search, encode_prompts,
                                               hf_prefix_allowed_tokens_fn, reference_beam_search)
from tests.tiny_families import FAMILIES, random_family_model
from trainers.models import tiny
from trainers.packing import tokenize_sample

END_TOKEN = 2  # the random models' EOS, appended to ragged codes as training appends EOS
SCORE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forward passes gain nothing from threads, and on a shared machine a thread pool waiting for a busy
    core makes each attention call ~1000x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_llama(seed: int, base_vocab: int, code_tokens: int) -> LlamaForCausalLM:
    """A tiny random LLaMA; initializer_range 0.3 spreads the logits (at HF's 0.02 every token is nearly equally
    likely and beams differ by float noise)."""
    config = LlamaConfig(vocab_size=base_vocab + code_tokens, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.3, tie_word_embeddings=seed % 2 == 0,
                         bos_token_id=1, eos_token_id=END_TOKEN, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def random_model(family: str, seed: int, base_vocab: int, code_tokens: int, window: int):
    """``random_llama``, or a random model of a family in ``tiny_families`` (sliding-window families get
    ``window``), with logits as spread."""
    if family == "llama":
        return random_llama(seed, base_vocab, code_tokens)
    windowed = {"sliding_window": window} if family in ("qwen2", "mistral") else {}
    return random_family_model(family, base_vocab + code_tokens, seed, initializer_range=0.3, bos_token_id=1,
                               eos_token_id=END_TOKEN, pad_token_id=0, **windowed)


@st.composite
def search_cases(draw, fixed_depth: bool | None = None, min_users: int = 1, max_users: int = 4, max_beams: int = 8,
                 family: str = "llama"):
    """A random model, a random prefix-free code set over its code tokens, prompts of random lengths, beams, K.

    Codes are fixed-depth (1-4 levels, like semantic IDs) or ragged (1-4 tokens plus the end token, like
    subtoken IDs); code tokens are per level (<a_*>, <b_*>, ...) or one shared alphabet. A sliding window (Qwen2,
    Mistral) of 2-12 tokens may hide prompt and code keys.
    """
    base_vocab = draw(st.integers(64, 128))
    alphabet = draw(st.integers(2, 6))
    per_level = draw(st.booleans())
    ragged = (not draw(st.booleans())) if fixed_depth is None else not fixed_depth
    if ragged:
        codes = draw(st.sets(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=4).map(tuple),
                             min_size=1, max_size=30))
    else:
        depth = draw(st.integers(1, 4))
        codes = draw(st.sets(st.tuples(*[st.integers(0, alphabet - 1)] * depth), min_size=1, max_size=30))
    sequences = [[base_vocab + level * alphabet * per_level + c for level, c in enumerate(code)]
                 for code in sorted(codes)]
    items = draw(st.permutations(range(100, 100 + len(sequences))))
    model = random_model(family, draw(st.integers(0, 2**16)), base_vocab, alphabet * (4 if per_level else 1),
                         window=draw(st.integers(2, 12)))  # at 1 HF's own sliding cache keeps no key
    trie = CodeTrie(sequences, items, vocab_size=model.config.vocab_size, end_token=END_TOKEN if ragged else None)
    if ragged:
        sequences = [s + [END_TOKEN] for s in sequences]
    prompts = draw(st.lists(st.lists(st.integers(3, base_vocab - 1), min_size=1, max_size=12),
                            min_size=min_users, max_size=max_users))
    num_beams = draw(st.integers(1, max_beams))
    top_k = draw(st.integers(1, num_beams))
    return model, trie, dict(zip(items, sequences)), prompts, num_beams, top_k


def sequence_log_prob(model, prompt: list[int], code: list[int], groups: list[list[int]] | None = None) -> float:
    """log p(code | prompt) from one forward pass over the whole sequence; with ``groups`` each code token's
    softmax runs over its level's tokens only."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + code])).logits[0].float()[len(prompt) - 1:-1]
    if groups is None:
        log_probs = torch.log_softmax(logits, dim=-1)
        return float(log_probs[torch.arange(len(code)), torch.tensor(code)].sum())
    return sum(float(torch.log_softmax(logits[level, groups[level]], dim=-1)[groups[level].index(token)])
               for level, token in enumerate(code))


def assert_same_results(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor],
                        tolerance: float = SCORE_TOLERANCE) -> None:
    assert torch.equal(got[0], expected[0]), (got, expected)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=tolerance)  # -inf matches -inf


def assert_valid_distinct_sorted(result: tuple[torch.Tensor, torch.Tensor], codes: dict[int, list[int]]) -> None:
    items, scores = result
    for row_items, row_scores in zip(items.tolist(), scores.tolist()):
        found = [i for i in row_items if i >= 0]
        assert all(i in codes for i in found) and len(set(found)) == len(found)
        assert row_items == found + [-1] * (len(row_items) - len(found)), "padding only at the end"
        assert all(math.isfinite(s) for s in row_scores[:len(found)])
        assert all(s == -math.inf for s in row_scores[len(found):])
        assert row_scores[:len(found)] == sorted(row_scores[:len(found)], reverse=True)
        assert all(s <= 0 for s in row_scores[:len(found)])


DECODERS = st.sampled_from(["shared_prompt", "copied_cache"])
NORMALISERS = st.sampled_from(["vocabulary", "per_level", "trie"])


@settings(max_examples=25, deadline=None)
@given(search_cases(), DECODERS, NORMALISERS)
def test_fast_search_matches_reference(case, decoder, normaliser):
    model, trie, codes, prompts, num_beams, top_k = case
    fast = constrained_beam_search(model, prompts, trie, num_beams, top_k, decoder=decoder, normaliser=normaliser)
    assert fast[0].shape == fast[1].shape == (len(prompts), top_k)
    assert_valid_distinct_sorted(fast, codes)
    assert_same_results(fast, reference_beam_search(model, prompts, trie, num_beams, top_k, normaliser))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_fast_search_matches_reference_for_each_family(family, data):
    model, trie, codes, prompts, num_beams, top_k = data.draw(search_cases(family=family))
    reference = reference_beam_search(model, prompts, trie, num_beams, top_k)
    for decoder in ("auto", "copied_cache"):
        fast = constrained_beam_search(model, prompts, trie, num_beams, top_k, decoder=decoder)
        assert_valid_distinct_sorted(fast, codes)
        assert_same_results(fast, reference)


@settings(max_examples=20, deadline=None)
@given(search_cases(max_users=2), st.integers(0, 5))
def test_enough_beams_make_the_search_exhaustive(case, extra_beams):
    model, trie, codes, prompts, _, _ = case
    num_beams = len(codes) + extra_beams
    top_k = min(num_beams, len(codes) + 2)  # asks for more items than exist: the tail is padding
    fast = constrained_beam_search(model, prompts, trie, num_beams, top_k)
    for user, prompt in enumerate(prompts):
        ranking = sorted(((sequence_log_prob(model, prompt, code), item) for item, code in codes.items()),
                         reverse=True)
        expected_items = [item for _, item in ranking] + [-1, -1]
        expected_scores = [score for score, _ in ranking] + [-math.inf] * 2
        assert fast[0][user].tolist() == expected_items[:top_k]
        torch.testing.assert_close(fast[1][user], torch.tensor(expected_scores[:top_k]), rtol=0,
                                   atol=SCORE_TOLERANCE)


@settings(max_examples=15, deadline=None)
@given(search_cases(fixed_depth=True, max_users=2))
def test_per_level_scores_are_each_levels_restricted_softmax(case):
    """normaliser=per_level: an exhaustive search ranks every item by the sum over its code tokens of a
    log-softmax over that level's tokens (every code's token at that depth), what the sequence objective
    trains; the whole-vocabulary scores differ whenever other tokens carry probability."""
    model, trie, codes, prompts, _, _ = case
    depth = len(next(iter(codes.values())))
    groups = [sorted({code[level] for code in codes.values()}) for level in range(depth)]
    num_beams = len(codes)
    fast = constrained_beam_search(model, prompts, trie, num_beams, num_beams, normaliser="per_level")
    for user, prompt in enumerate(prompts):
        expected = {item: sequence_log_prob(model, prompt, code, groups) for item, code in codes.items()}
        ranking = sorted(((score, item) for item, score in expected.items()), reverse=True)
        torch.testing.assert_close(fast[1][user], torch.tensor([s for s, _ in ranking]), rtol=0,
                                   atol=SCORE_TOLERANCE)
        assert all(abs(expected[item] - ranking[rank][0]) < SCORE_TOLERANCE
                   for rank, item in enumerate(fast[0][user].tolist()))  # ties may swap places
        whole = sequence_log_prob(model, prompt, codes[fast[0][user, 0].item()])
        assert whole < fast[1][user, 0].item() - 1e-3  # the model gives the other tokens some probability


@settings(max_examples=15, deadline=None)
@given(search_cases(max_users=2))
def test_trie_scores_are_a_distribution_over_the_items(case):
    """normaliser=trie: each token is normalised over its trie node's children only, so an item's score is its
    exact log-likelihood under the trie (a hierarchical softmax): over every item the probabilities sum to 1,
    and a node with one child adds nothing."""
    model, trie, codes, prompts, _, _ = case
    num_beams = len(codes)
    items, scores = constrained_beam_search(model, prompts, trie, num_beams, num_beams, normaliser="trie")
    for user, prompt in enumerate(prompts):
        assert sorted(items[user].tolist()) == sorted(codes)
        assert torch.logsumexp(scores[user], 0).item() == pytest.approx(0.0, abs=1e-4)
        by_hand = {}
        for item, code in codes.items():
            total = 0.0
            for depth, token in enumerate(code):
                siblings = sorted({c[depth] for c in codes.values() if list(c[:depth]) == list(code[:depth])})
                total += sequence_log_prob(model, list(prompt) + list(code[:depth]), [token], [siblings])
            by_hand[item] = total
        for item, score in zip(items[user].tolist(), scores[user].tolist()):
            assert score == pytest.approx(by_hand[item], abs=SCORE_TOLERANCE)


def test_unknown_normaliser_is_refused():
    model = random_llama(3, 64, 4)
    trie = CodeTrie([[64, 65], [64, 66]], [7, 8], vocab_size=68)
    with pytest.raises(ValueError, match="normaliser"):
        constrained_beam_search(model, [[5]], trie, 2, 2, normaliser="level")


@settings(max_examples=15, deadline=None)
@given(search_cases(min_users=2, max_users=6), st.integers(1, 3), DECODERS)
def test_batched_users_with_different_prompt_lengths_match_one_at_a_time(case, users_per_batch, decoder):
    model, trie, _, prompts, num_beams, top_k = case
    batched = constrained_beam_search(model, prompts, trie, num_beams, top_k, decoder=decoder)
    alone = [constrained_beam_search(model, [p], trie, num_beams, top_k, decoder=decoder) for p in prompts]
    assert_same_results(batched, (torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone])))
    chunked = constrained_beam_search(model, prompts, trie, num_beams, top_k, users_per_batch=users_per_batch,
                                      decoder=decoder)
    assert_same_results(chunked, batched)


def test_fewer_items_than_k_are_padded_with_minus_one_and_minus_inf():
    model = random_llama(3, 64, 4)
    trie = CodeTrie([[64, 65], [64, 66], [67, 64]], [7, 8, 9], vocab_size=68)
    items, scores = constrained_beam_search(model, [[5, 6, 7]], trie, num_beams=5, top_k=5)
    assert sorted(items[0, :3].tolist()) == [7, 8, 9] and items[0, 3:].tolist() == [-1, -1]
    assert torch.isfinite(scores[0, :3]).all() and torch.isneginf(scores[0, 3:]).all()
    assert_same_results((items, scores), reference_beam_search(model, [[5, 6, 7]], trie, 5, 5))


@pytest.mark.parametrize("family, seed", [("llama", 0), ("llama", 1), *((f, 0) for f in FAMILIES)])
def test_shared_prompt_prefill_matches_the_stock_forward(family, seed):
    """The layers run by hand (last layer on the last token only) give the stock forward's next-token logits
    and, at every real prompt position, its keys/values; left padding of any width changes nothing. Qwen2's and
    Mistral's windows (6 and 5 tokens) are shorter than the longest prompt, so they hide keys here."""
    model = random_model(family, seed, 64, 8, window=5)
    prompts = [[1, 5, 9, 11, 40, 6, 7, 8, 9, 10], [1, 7], [1, 3, 3, 3, 3, 3, 3, 20], [1]]
    stock, shared = CopiedCacheDecoder(model), SharedPromptDecoder(model)
    with torch.inference_mode():
        expected, got = stock.prefill(prompts), shared.prefill(prompts)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        plain = torch.cat([model(input_ids=torch.tensor([prompt])).logits[:, -1] for prompt in prompts])
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-5)
        for layer, cached in enumerate(stock.cache.layers):
            kept = cached.keys.shape[2]  # a sliding-window layer of the stock cache keeps only the latest keys
            for row, prompt in enumerate(prompts):
                real = slice(-min(len(prompt), kept), None)
                torch.testing.assert_close(shared.prompt_keys[layer][row, :, real], cached.keys[row, :, real],
                                           rtol=0, atol=1e-5)
                torch.testing.assert_close(shared.prompt_values[layer][row, :, real],
                                           cached.values[row, :, real], rtol=0, atol=1e-5)
        alone = [shared.prefill([prompt]) for prompt in prompts]
    torch.testing.assert_close(torch.cat(alone), got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
def test_llama_family_models_get_the_shared_prompt_decoder(family):
    model = random_model(family, 0, 64, 4, window=5)
    assert type(decoder_for(model)) is SharedPromptDecoder
    assert type(decoder_for(model, "copied_cache")) is CopiedCacheDecoder
    with pytest.raises(ValueError, match="not one of"):
        decoder_for(model, "fastest")


def test_rejects_tries_where_a_code_is_a_prefix_of_another_and_k_above_beams():
    model = random_llama(0, 64, 4)
    nested = CodeTrie([[64], [64, 65]], vocab_size=68)
    for search in (constrained_beam_search, reference_beam_search):
        with pytest.raises(ValueError, match="end_token"):
            search(model, [[5]], nested, 2, 1)
        with pytest.raises(ValueError, match="top_k <= num_beams"):
            search(model, [[5]], CodeTrie([[64]], vocab_size=68), 2, 3)


def semantic_run(tmp_path, items: int = 60, levels: int = 3, codes: int = 8, seed: int = 0):
    """An item_ids/ folder with random semantic codes, and tiny() built with that scheme's tokens."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.unique(torch.randint(0, codes, (items, levels), generator=generator), dim=0)
    matrix = matrix[torch.randperm(len(matrix), generator=generator)].tolist()
    tokens = [[semantic_token(level, c) for level, c in enumerate(row)] for row in matrix]
    table = item_codes_table(pa.table({"item_id": list(range(len(matrix))),
                                       "source_id": [f"s{i}" for i in range(len(matrix))]}), matrix, tokens)
    folder = tmp_path / "item_ids"
    folder.mkdir()
    pq.write_table(table, folder / ITEM_CODES_FILE)
    model, tokenizer = tiny(semantic_vocabulary(levels, codes), hidden_size=64, intermediate_size=128, seed=seed)
    with torch.no_grad():  # spread the logits (see random_llama)
        model.get_input_embeddings().weight.mul_(8.0)
    return str(folder), tokens, model.eval(), tokenizer


def test_token_trie_maps_item_tokens_to_lm_ids_and_prompts_are_framed_as_in_training(tmp_path):
    folder, tokens, _, tokenizer = semantic_run(tmp_path)
    trie = build_token_trie(folder, tokenizer)
    for item, row in enumerate(tokens):
        assert trie.item_of(tokenizer.convert_tokens_to_ids(row)) == item
    assert trie.item_of(tokenizer.convert_tokens_to_ids(list(reversed(tokens[0])))) == -1
    prompt = "The user bought <a_1><b_2><c_3> and then"
    ids, prompt_len = tokenize_sample(tokenizer, prompt, "<a_0><b_0><c_0>", seq_len=256)
    assert encode_prompts(tokenizer, [prompt]) == [ids[:prompt_len]]
    assert encode_prompts(tokenizer, [prompt], max_prompt_tokens=5)[0] == [ids[0]] + ids[prompt_len - 4:prompt_len]
    with pytest.raises(ValueError, match="not in the tokenizer"):
        build_token_trie(folder, tiny([])[1])


def test_generation_config_changes_nothing(tmp_path):
    folder, _, model, tokenizer = semantic_run(tmp_path)
    trie = build_token_trie(folder, tokenizer)
    prompts = encode_prompts(tokenizer, ["User 1 bought <a_1><b_2><c_3>", "User 2 likes microscopes a lot"])
    before = constrained_beam_search(model, prompts, trie, num_beams=6, top_k=4)
    model.generation_config.temperature = 0.1
    model.generation_config.do_sample = True
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.length_penalty = -2.0
    model.generation_config.num_beams = 1
    model.train()  # the search turns dropout off for itself and gives the model back as it found it
    after = constrained_beam_search(model, prompts, trie, num_beams=6, top_k=4)
    assert model.training
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert (before[0] >= 0).all()


def test_agrees_with_hugging_face_beam_search(tmp_path):
    # Fixed-depth codes: HF's beam search keeps the same beams; its sequence scores are divided by the length.
    folder, _, model, tokenizer = semantic_run(tmp_path)
    trie = build_token_trie(folder, tokenizer)
    prompts = encode_prompts(tokenizer, ["User 1 bought <a_1><b_2><c_3>", "Short", "User 3 likes lenses and slides"])
    num_beams, top_k = 8, 5
    ours = constrained_beam_search(model, prompts, trie, num_beams, top_k)
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, num_beams=num_beams, num_return_sequences=top_k, do_sample=False,
                         max_new_tokens=trie.depth, early_stopping=False, length_penalty=1.0,
                         prefix_allowed_tokens_fn=hf_prefix_allowed_tokens_fn(trie, width, tokenizer.eos_token_id),
                         return_dict_in_generate=True, output_scores=True, pad_token_id=tokenizer.pad_token_id)
    hf_items = trie.item_of(out.sequences[:, width:]).view(len(prompts), top_k)
    assert torch.equal(ours[0], hf_items)
    torch.testing.assert_close(ours[1], out.sequences_scores.view(len(prompts), top_k) * trie.depth, rtol=0,
                               atol=SCORE_TOLERANCE)
