"""LoID end to end on a slice of the shipped review data: build-reviews, the source plugin and a target run with
the frozen plugin through the shared Ray Train + DeepSpeed ZeRO-2 loop (2 CPU workers, a few steps), then
evaluate-loid rebuilding the runs from their saved plugins; a worker killed mid-run resumes from the last
checkpoint and ends exactly where an uninterrupted run does; train.use_gpu reaches the Ray trainer."""

from __future__ import annotations

import json
from pathlib import Path

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


def _loid_run(run_dir, sliced_domains, *extra):
    """The config train-loid gives the source run, with the test's overrides."""
    from launcher.config import load_config
    from trainers.loid.objective import run_config

    cfg = load_config(str(REPO / "configs" / "loid_reviews.yaml"), [
        f"run_dir={run_dir}", f"reviews.domains={{digital_music: {sliced_domains / 'dm'}, "
                              f"musical_instruments: {sliced_domains / 'mi'}}}",
        "train.micro_batch_size=24", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=3",
        "loid.epochs=2", "loid.max_steps=8", "loid.variants=[]", *extra])
    return run_config(cfg, "source_digital_music")


@pytest.fixture(scope="module")
def reviews_built(sliced_domains, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loid_reviews") / "run"
    assert main(["build-reviews", str(REPO / "configs" / "loid_reviews.yaml"), f"run_dir={run_dir}",
                 f"reviews.domains={{digital_music: {sliced_domains / 'dm'}, "
                 f"musical_instruments: {sliced_domains / 'mi'}}}"]) == 0
    return run_dir


def _fresh(reviews_built, dst):
    import shutil

    shutil.copytree(reviews_built / "domains", dst / "domains")
    return dst


def _seen(train_dir, rank: int) -> dict[int, list[int]]:
    """step -> review rows; a step redone after the restart keeps its last record."""
    steps = {}
    for line in (train_dir / "samples_seen" / f"rank-{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["sample_ids"]
    return steps


def test_killed_loid_worker_resumes_from_checkpoint_exactly(ray_local, reviews_built, sliced_domains, tmp_path,
                                                            monkeypatch):
    """Like the SFT test: rank 1 dies before step 5; Ray restarts from the step-3 checkpoint and the run ends
    with the same batches per step, the same weights, the same best epoch and the same plugin as a run that was
    never interrupted. 8 steps of 5 per epoch: valid MSE after step 5 (an epoch) and 8 (the end)."""
    from trainers.ray_launch import run_training

    plain = _loid_run(_fresh(reviews_built, tmp_path / "plain"), sliced_domains)
    assert plain.train.max_steps == 8 and plain.train.objective == "loid"
    out_plain = run_training(plain)

    killed_dir = _fresh(reviews_built, tmp_path / "killed")
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv("RECLLM_FAULT_AT_STEP", "4")
    monkeypatch.setenv("RECLLM_FAULT_MARKER", str(marker))
    out_killed = run_training(_loid_run(killed_dir, sliced_domains, "train.max_failures=1"))
    assert marker.exists(), "the fault was never injected"

    train = {name: root / "loid" / "source_digital_music" / "train"
             for name, root in (("plain", tmp_path / "plain"), ("killed", killed_dir))}
    lines = (train["killed"] / "samples_seen" / "rank-0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # step 4 redone after the restart
    for rank in range(2):
        plain_seen, killed_seen = _seen(train["plain"], rank), _seen(train["killed"], rank)
        assert sorted(killed_seen) == list(range(1, 9)) and killed_seen == plain_seen
    digests = {name: [(t / "param_digest" / f"rank-{r}.txt").read_text() for r in range(2)] for name, t in train.items()}
    assert digests["killed"] == digests["plain"] and digests["plain"][0] == digests["plain"][1]

    info = {name: json.loads((Path(out["model_dir"]) / "run.json").read_text())
            for name, out in (("plain", out_plain), ("killed", out_killed))}
    assert info["killed"]["steps"] == 8
    for key in ("best_step", "best_valid_mse", "loss", "l_rec", "l_cl", "frozen"):
        assert info["killed"][key] == info["plain"][key], key
    valid_steps = [r["step"] for r in map(json.loads, (train["plain"] / "logs" / "metrics.jsonl").read_text()
                                                         .splitlines()) if "valid_mse" in r]
    assert valid_steps == [5, 8]
    plugin = "plugin/digital_music/adapter_model.safetensors"
    assert (Path(out_killed["model_dir"]) / plugin).read_bytes() == (Path(out_plain["model_dir"]) / plugin).read_bytes()


def test_use_gpu_reaches_the_ray_trainer_for_loid(reviews_built, sliced_domains, tmp_path, monkeypatch):
    """train.use_gpu=true: run_training builds one GPU per worker and NCCL for the loid objective, and the workers'
    environment does not pin DeepSpeed to the CPU (checked on the trainer it builds, without a GPU)."""
    import ray.train.torch

    from trainers import ray_launch
    from trainers.loid.objective import LoIDObjective

    built, envs = {}, []

    class Stop(Exception):
        pass

    class CapturingTrainer:
        def __init__(self, loop, **kwargs):
            built.update(kwargs, loop=loop)
            raise Stop

    monkeypatch.setattr(ray_launch, "connect_ray", envs.append)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", CapturingTrainer)
    cfg = _loid_run(_fresh(reviews_built, tmp_path / "run"), sliced_domains, "train.use_gpu=true", "train.num_workers=4")
    with pytest.raises(Stop):
        ray_launch.run_training(cfg)
    assert built["scaling_config"].use_gpu is True and built["scaling_config"].num_workers == 4
    assert built["scaling_config"].resources_per_worker == {"CPU": 0.5, "GPU": 1}
    assert built["torch_config"].backend == "nccl"
    assert "DS_ACCELERATOR" not in envs[0]
    config = built["train_loop_config"]
    assert config["cfg"].train.use_gpu is True and config["objective_cls"] is LoIDObjective
    assert config["train_dir"].endswith("loid/source_digital_music/train")
    assert built["loop"].__name__ == "train_loop_per_worker"  # the one shared loop
