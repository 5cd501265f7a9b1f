"""Size ``auto``: a checkpoint of each family (Llama 3, Qwen2, Qwen3, Mistral; tiny, random, saved in the test)
loads as its own class with the new tokens added through its tokenizer, the plan counts it from config.json
alone (the real Llama-3.1-8B shape too), and bad checkpoints give one-line config errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.config_schema import ConfigError, load
from launcher.cli import main
from launcher.config import load_config
from tests.conftest import REPO
from tests.tiny_families import FAMILIES, save_tiny_checkpoint
from trainers.memory_plan import plan_memory
from trainers.model_config import ModelConfig
from trainers.models import build_model, count_parameters

ITEM_TOKENS = [f"<a_{i}>" for i in range(6)] + ["<b_0>", "<b_1>", "<user_7>"]
TINY_VOCAB = 4096
CLASSES = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mistral": "MistralForCausalLM"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    return {family: save_tiny_checkpoint(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_as_its_family_with_the_new_tokens(family, checkpoints):
    folder = checkpoints[family]
    saved = load_file(str(folder / "model.safetensors"))
    model, tok = build_model(ModelConfig(size="auto", checkpoint=str(folder), new_token_noise=0.0), ITEM_TOKENS)
    assert type(model).__name__ == CLASSES[family]
    ids = tok.convert_tokens_to_ids(ITEM_TOKENS)
    assert ids == list(range(TINY_VOCAB, TINY_VOCAB + len(ITEM_TOKENS)))
    assert tok("bought <a_3><b_1>", add_special_tokens=False)["input_ids"][-2:] == [ids[3], ids[7]]
    embed, head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    old_embed = saved["model.embed_tokens.weight"]
    torch.testing.assert_close(embed[:TINY_VOCAB], old_embed, rtol=0, atol=0)  # the checkpoint's weights
    torch.testing.assert_close(embed[ids], old_embed.mean(dim=0).expand(len(ids), -1))
    if model.config.tie_word_embeddings:
        assert head.data_ptr() == embed.data_ptr()
    else:  # the untied head gets its own new rows, from its own old rows
        old_head = saved["lm_head.weight"]
        assert head.data_ptr() != embed.data_ptr() and head.shape == embed.shape
        torch.testing.assert_close(head[:TINY_VOCAB], old_head, rtol=0, atol=0)
        torch.testing.assert_close(head[ids], old_head.mean(dim=0).expand(len(ids), -1))
    for name, tensor in saved.items():  # everything else is the checkpoint's, family extras included
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    extras = {"qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.q_norm.weight"}
    if family in extras:
        assert f"model.layers.0.{extras[family]}" in saved
    # the plan, from config.json alone, counts exactly the model that was built
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["model.size=auto", f"model.checkpoint={folder}"])
    plan = plan_memory(cfg, len(ITEM_TOKENS))
    assert plan.total_params == count_parameters(model)
    assert plan.base_params == sum(t.numel() for t in saved.values())


def test_plan_counts_llama31_8b_from_its_config_json_alone(tmp_path, capsys):
    folder = REPO / "configs" / "models" / "llama31_8b"
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.md", "config.json"]  # no weights to read
    assert main(["plan", str(REPO / "configs" / "llama31_8b_zero3.yaml"), f"model.checkpoint={folder}",
                 f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    rows = 1024 * 4096 * 2  # 4 levels x 256 codes; embedding and untied head rows
    assert (f"model llama ({folder / 'config.json'}): {8_030_261_248 + rows:,} parameters "
            f"(8,030,261,248 + {rows:,} for 1,024 new tokens)") in out, out
    assert "ZeRO-3, bf16" in out and "fits" in out


def test_bad_checkpoints_are_one_line_config_errors(tmp_path, checkpoints):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for overrides, needle in (
            (["size=auto"], "checkpoint: empty with size 'auto'"),
            (["size=auto", f"checkpoint={other}"], f"checkpoint: '{other}' is a 'gpt2' model; expected model_type "
                                                   "one of ['llama', 'mistral', 'qwen2', 'qwen3']"),
            ([f"checkpoint={broken}"], "has an unreadable config.json (JSONDecodeError)")):
        with pytest.raises(ConfigError) as err:
            load(ModelConfig, None, overrides)
        assert needle in str(err.value)
    shapes_only = tmp_path / "shapes_only"
    shapes_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shapes_only / name).write_bytes((checkpoints["qwen3"] / name).read_bytes())
    cfg = ModelConfig(size="auto", checkpoint=str(shapes_only))
    assert cfg.check() == []  # plan needs config.json only
    with pytest.raises(ValueError, match="has config.json but no weights"):
        build_model(cfg, ITEM_TOKENS)
    (shapes_only / "tokenizer.json").unlink()
    (shapes_only / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        build_model(cfg, ITEM_TOKENS)


def test_a_named_size_checks_a_family_checkpoint_before_reading_weights(checkpoints):
    with pytest.raises(ValueError, match="is not a tiny model: hidden_size: checkpoint 64, expected 128"):
        build_model(ModelConfig(size="tiny", checkpoint=str(checkpoints["mistral"])), ITEM_TOKENS)
