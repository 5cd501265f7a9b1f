"""The run_dir remembers (issue #27): every writing command publishes run_dir/config/config.yaml, the resolved
config with every override, which a later stage takes as its CONFIG without retyping anything, and a runs.jsonl
line with the git commit and package versions; `pipeline --from STAGE` resumes a pipeline."""

from __future__ import annotations

import json

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
