"""The config scheme: YAML + key=value overrides, typed coercion, all errors reported at once."""

from __future__ import annotations

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.config_schema import ConfigError, field_docs
from launcher.config import load_config
from tests.conftest import REPO


def test_demo_yaml_loads_and_overrides_apply():
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["data.num_shards=7", "data.split=global_time", "seed=3"])
    assert cfg.data.num_shards == 7 and cfg.data.split == "global_time" and cfg.seed == 3
    assert cfg.data.name == "Scientific"


def test_every_error_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: csvv\n  num_shards: -1\n  min_user_interactions: many\n  bogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad), ["data.path=x", "seed=abc"])
    text = str(err.value)
    for needle in ("data.format: 'csvv' is not one of", "data.num_shards: -1 must be > 0",
                   "data.min_user_interactions: expected an integer, got 'many'", "data.bogus: unknown field",
                   "seed: expected an integer, got 'abc'"):
        assert needle in text, text
    assert len(err.value.problems) == 5


def test_every_yaml_in_configs_starts_with_its_command():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# recllm ") and path.name in first, f"{path.name}: first line {first!r}"


def _config_classes(cls, seen=None):
    import dataclasses
    from typing import get_type_hints

    seen = seen if seen is not None else []
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            _config_classes(tp, seen)
    return seen


def test_every_field_of_every_section_has_a_docstring():
    import dataclasses

    from launcher.config import RecllmConfig

    classes = _config_classes(RecllmConfig)
    assert DataConfig in classes
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if not field_docs(c).get(f.name)]
    assert not missing, missing


@pytest.mark.parametrize("overrides, needle", [
    (["train.objective=sequence", "samples.tasks=[sequential]"], "'sequence' trains on the user_sequence task"),
    (["train.objective=cllm4rec", "ids.scheme=semantic"], "'cllm4rec' needs one token per item"),
    (["train.objective=controlrec", "ids.scheme=atomic", "model.attn_implementation=flash_attention_2",
      "model.dtype=bfloat16"], "train.controlrec.visibility: needs model.attn_implementation sdpa or eager"),
    (["train.objective=controlrec", "ids.scheme=semantic", "train.controlrec.visibility=true"],
     "train.controlrec.visibility: needs items named by their IDs"),
    (["infer.scorer=multinomial", "ids.scheme=semantic"], "infer.scorer: 'multinomial' scores one token per item"),
    (["train.objective=nonesuch"], "train.objective: 'nonesuch' is not one of"),
    (["stages=[prepare,build-samples,train,infer,evaluate]"],
     "stages: evaluate (eval.baseline=true) reads run_dir/baseline/ after prepare writes a new dataset/"),
    (["stages=[prepare,build-ids,train-baseline]", "ids.scheme=semantic"],
     "stages: build-ids (ids.scheme=semantic) reads run_dir/baseline/ before train-baseline writes it"),
    (["stages=[prepare,build-ids,train-baseline]", "ids.scheme=subtoken", "ids.subtoken_numbers=collaborative"],
     "stages: build-ids (ids.subtoken_numbers=collaborative) reads run_dir/baseline/ before train-baseline writes"),
    (["stages=[train-baseline,prepare]"], "stages: train-baseline before prepare trains on the previous dataset/"),
    (["stages=[prepare,build-ids,build-samples,train]", "model.new_token_init=collab"],
     "stages: train (model.new_token_init=collab) reads run_dir/baseline/ after prepare writes a new dataset/"),
    (["data.path="], "data.path: empty; give the folder with the raw data"),
    (["train.sequence.item_loss=0.5"], "train.sequence.item_loss: the flat item softmax beside the codes needs"),
])
def test_plan_exits_2_on_each_cross_section_rule(overrides, needle, capsys):
    """Rules spanning sections are checked when the config loads, so `recllm plan` rejects them before Ray starts."""
    from launcher.cli import main

    assert main(["plan", str(REPO / "configs" / "demo.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize("config", ["loid_reviews.yaml", "controlrec_tasks.yaml"])
def test_review_flows_need_no_data_section_but_prepare_does(config, tmp_path, capsys):
    """Only prepare reads ``data:``: the review flows, which name their domains under ``reviews:``, leave it out
    and load; `recllm prepare` on such a config is one line naming data.path, exit 2, nothing written."""
    from launcher.cli import main

    text = (REPO / "configs" / config).read_text()
    assert "\ndata:" not in text
    assert "prepare" not in load_config(str(REPO / "configs" / config)).stages
    assert main(["prepare", str(REPO / "configs" / config), f"run_dir={tmp_path / 'run'}"]) == 2
    assert "data.path: empty" in capsys.readouterr().err
    assert not (tmp_path / "run" / "dataset").exists()


def test_a_registered_objective_is_accepted_by_name_without_editing_the_project():
    from trainers.recipes.objectives import SFTObjective
    from trainers.recipes.registry import OBJECTIVES, register_objective

    @register_objective("toy_for_config_test")
    class Toy(SFTObjective):
        pass

    try:
        cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["train.objective=toy_for_config_test"])
        assert cfg.train.objective == "toy_for_config_test"
    finally:
        OBJECTIVES.pop("toy_for_config_test")


@pytest.mark.parametrize("stages, extra", [
    ("[prepare,build-ids,build-samples,train,infer]", ["ids.scheme=atomic"]),  # nothing reads the baseline
    ("[prepare,build-samples,train,infer,evaluate]", ["eval.baseline=false"]),
    ("[build-ids,evaluate]", []),  # a baseline trained earlier, on the dataset/ already there
    ("[prepare,train-baseline,build-ids,evaluate]", []),
])
def test_stage_lists_that_read_the_baseline_in_order_are_accepted(stages, extra):
    cfg = load_config(str(REPO / "configs" / "alignment_sft.yaml"), [f"stages={stages}", *extra])  # semantic IDs
    assert cfg.stages == stages.strip("[]").split(",")
