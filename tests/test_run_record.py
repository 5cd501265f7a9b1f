"""The run_dir remembers (issue #27): every writing command publishes run_dir/config/config.yaml, the resolved
config with every override, which a later stage takes as its CONFIG without retyping anything, and a runs.jsonl
line with the git commit and package versions; `pipeline --from STAGE` resumes a pipeline."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher.cli import main
from tests.toy_run import CONFIG, FAST, write_raw


def test_a_later_stage_starts_from_the_recorded_config(tmp_path, capsys):
    raw, run_dir = write_raw(tmp_path / "raw"), tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy", "ids.scheme=atomic", "samples.max_sequence_items=7",
                 "seed=5", *FAST]
    assert main(["prepare", CONFIG, *overrides]) == 0
    assert main(["build-ids", CONFIG, *overrides]) == 0
    record = run_dir / "config" / "config.yaml"
    resolved = yaml.safe_load(record.read_text())
    assert resolved["data"]["path"] == str(raw) and resolved["seed"] == 5 and resolved["samples"]["max_sequence_items"] == 7
    # build-samples from the record alone: no override retyped, and the run uses the recorded ones
    assert main(["build-samples", str(record)]) == 0
    manifest = json.loads((run_dir / "samples" / "manifest.json").read_text())
    assert manifest["counts"]["train"]
    runs = [json.loads(line) for line in (run_dir / "config" / "runs.jsonl").read_text().splitlines()]
    assert [r["command"] for r in runs] == ["prepare", "build-ids", "build-samples"]
    assert runs[0]["overrides"] == overrides and runs[0]["versions"]["torch"] and "git_commit" in runs[0]
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_pipeline_from_a_stage_runs_only_the_stages_after_it(tmp_path, capsys):
    raw, run_dir = write_raw(tmp_path / "raw"), tmp_path / "run"
    args = [CONFIG, f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy", "ids.scheme=atomic",
            "stages=[prepare,build-ids,build-samples]", *FAST]
    assert main(["pipeline", *args, "--from", "build-ids"]) == 2  # nothing prepared yet: build-ids says so
    assert "run `recllm prepare` first" in capsys.readouterr().err
    assert main(["prepare", *args]) == 0
    capsys.readouterr()
    assert main(["pipeline", *args, "--from=build-ids"]) == 0
    out = capsys.readouterr().out
    assert "stage build-ids" in out and "stage prepare" not in out and (run_dir / "samples").exists()
    assert main(["pipeline", *args, "--from", "build-idz"]) == 2
    assert "did you mean 'build-ids'?" in capsys.readouterr().err


def test_a_later_stage_takes_the_earlier_stages_settings_from_the_record(tmp_path, capsys):
    """`recllm build-samples CONFIG run_dir=R` after prepare and build-ids ran with overrides: the data and ids
    the earlier stages used come from R's record without retyping them (the CONFIG alone names another data.path)."""
    raw, run_dir = write_raw(tmp_path / "raw"), tmp_path / "run"
    earlier = [f"data.path={raw}", "data.name=Toy", "ids.scheme=atomic", *FAST]
    assert main(["prepare", CONFIG, f"run_dir={run_dir}", *earlier]) == 0
    assert main(["build-ids", CONFIG, f"run_dir={run_dir}", *earlier]) == 0
    capsys.readouterr()
    assert main(["build-samples", CONFIG, f"run_dir={run_dir}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "using the run_dir's" in out and "2 setting(s)" in out and "data.path" in out and "data.name" in out
    assert json.loads((run_dir / "samples" / "manifest.json").read_text())["counts"]["train"]
    resolved = yaml.safe_load((run_dir / "config" / "config.yaml").read_text())
    assert resolved["ids"]["scheme"] == "atomic" and resolved["data"]["path"] == str(raw)


def test_an_override_that_changes_what_an_earlier_stage_used_is_one_line(tmp_path, capsys):
    raw, run_dir = write_raw(tmp_path / "raw"), tmp_path / "run"
    earlier = [f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy", "ids.scheme=atomic", *FAST]
    assert main(["prepare", CONFIG, *earlier]) == 0
    assert main(["build-ids", CONFIG, *earlier]) == 0
    capsys.readouterr()
    assert main(["build-samples", CONFIG, *earlier, "data.max_history=20"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.max_history=20 conflicts with 50, which `prepare` used" in err
    assert not (run_dir / "samples").exists()
    # rerunning from the stage that used it may change it
    assert main(["pipeline", CONFIG, *earlier, "data.max_history=20", "stages=[prepare,build-ids,build-samples]"]) == 0
    assert yaml.safe_load((run_dir / "config" / "config.yaml").read_text())["data"]["max_history"] == 20


def test_merge_takes_the_earlier_stages_fields_and_leaves_the_commands_own():
    from data_pipeline.config_schema import ConfigError
    from launcher.recorded_config import merge_recorded

    stages = {"prepare": {"sections": {"data": {"path": "/a", "name": "A"}}},
              "train": {"sections": {"train": {"max_steps": 20}, "model": {"size": "tiny"}}},
              "evaluate": {"sections": {"eval": {"ks": [10]}}}}
    given = {"seed": 0, "data": {"path": "/b", "name": "A"}, "train": {"max_steps": 1500}, "model": {"size": "tiny"},
             "eval": {"ks": [5, 10]}}
    merged, taken = merge_recorded(given, stages, "infer", [], "R/config/stages.json")
    assert merged == {**given, "data": {"path": "/a", "name": "A"}, "train": {"max_steps": 20}}
    assert sorted(taken) == ["data.path", "train.max_steps"]
    assert merge_recorded(given, stages, "prepare", [], "R")[1] == []  # nothing comes before prepare
    assert merge_recorded(given, {}, "evaluate", [], "R")[1] == []  # no stage ran here yet
    with pytest.raises(ConfigError, match=r"^run_dir record: train.max_steps=1500 conflicts with 20, which `train` used"):
        merge_recorded(given, stages, "evaluate", ["train={max_steps: 1500}"], "R")


def test_the_record_keeps_what_each_stage_last_ran_with(tmp_path):
    """stages.json holds each stage's sections as its own last run had them, not the last command's view."""
    raw, run_dir = write_raw(tmp_path / "raw"), tmp_path / "run"
    base = [f"run_dir={run_dir}", f"data.path={raw}", "data.name=Toy", *FAST]
    assert main(["pipeline", CONFIG, *base, "stages=[prepare,build-ids]", "ids.user_tokens=true"]) == 0
    assert main(["prepare", CONFIG, *base, "ids.user_tokens=false"]) == 0  # prepare does not rebuild item ids
    stages = json.loads((run_dir / "config" / "stages.json").read_text())
    assert sorted(stages) == ["build-ids", "prepare"] and stages["prepare"]["command"] == "prepare"
    assert stages["build-ids"]["sections"]["ids"]["user_tokens"] is True
    assert stages["prepare"]["sections"]["data"]["path"] == str(raw)
