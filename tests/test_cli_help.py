"""Day one (issue #27): `recllm --help` and `recllm <command> --help` come from the config's own docs, `--version`
works, and a mistyped command or key gets a "did you mean"."""

from __future__ import annotations

import yaml

from launcher.cli import main
from launcher.command_help import COMMANDS
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


def test_help_exits_zero_and_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train-baseline", "build-ids", "train", "infer", "evaluate", "pipeline", "submit"):
        assert f"  {command} " in out
    assert set(COMMANDS) >= {"prepare", "train", "infer", "evaluate", "plan", "pipeline"}


def test_command_help_documents_every_field_it_reads(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps  int = 50" in out and "Optimizer steps to run" in out
    assert "model.size" in out and "run_dir" in out
    assert main(["build-ids", "--help"]) == 0
    out = capsys.readouterr().out
    assert "text.vectors  bool = False" in out and "text.layer" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("recllm ")


def test_unknown_command_and_key_suggest_the_right_one(capsys, tmp_path):
    assert main(["prepar", DEMO]) == 2
    assert "did you mean 'prepare'?" in capsys.readouterr().err
    assert main(["prepare", DEMO, f"run_dir={tmp_path / 'run'}", "train.max_step=5"]) == 2
    err = capsys.readouterr().err
    assert "train.max_step: unknown field of TrainConfig; did you mean 'max_steps'?" in err
    assert not (tmp_path / "run").exists()


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", DEMO, "train.max_steps=7", "seed=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["max_steps"] == 7 and resolved["seed"] == 3
    assert resolved["data"]["name"] == "Scientific"


def test_a_config_typo_answers_in_under_a_second_without_torch():
    import subprocess
    import sys
    import time

    code = ("import sys, time; t = time.perf_counter()\n"
            "from launcher.cli import main\n"
            "rc = main(['prepare', 'configs/demo.yaml', 'train.max_step=5'])\n"
            "print(rc, round(time.perf_counter() - t, 3), 'torch' in sys.modules)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    rc, seconds, torch_loaded = out.stdout.split()
    assert rc == "2" and "did you mean 'max_steps'?" in out.stderr
    assert torch_loaded == "False" and float(seconds) < 1.0, (seconds, time.perf_counter() - start)
