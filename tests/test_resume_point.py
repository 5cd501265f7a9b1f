"""resume_point: the newest checkpoint every rank finished, found on storage without Ray (Ray Train may not have
registered it when a worker died between its upload and the controller's poll)."""

import json

from trainers.resume_point import latest_checkpoint


def _checkpoint(root, name, step, ranks):
    folder = root / "sft" / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.safetensors").write_bytes(b"w")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    for r in ranks:
        (folder / "loader").mkdir(exist_ok=True)
        (folder / "loader" / f"rank-{r}.json").write_text("{}")
        (folder / "optimizer").mkdir(exist_ok=True)
        for suffix in (".safetensors", ".json"):
            (folder / "optimizer" / f"rank-{r}{suffix}").write_bytes(b"o")
    return folder


def test_the_newest_checkpoint_every_rank_finished_wins(tmp_path):
    assert latest_checkpoint(str(tmp_path / "ray"), world=2) is None
    root = tmp_path / "ray"
    step3 = _checkpoint(root, "checkpoint_2026-01-01_00-00-03.000", 3, ranks=[0, 1])
    _checkpoint(root, "checkpoint_2026-01-01_00-00-01.000", 1, ranks=[0, 1])
    step6 = _checkpoint(root, "checkpoint_2026-01-01_00-00-06.000", 6, ranks=[0])  # rank 1 died before uploading
    assert latest_checkpoint(str(root), world=2) == (str(step3), 3)
    assert latest_checkpoint(str(root)) == (str(step6), 6)  # without a world, as `train.resume=true` asks
    (step6 / "loader" / "rank-1.json").write_text("{}")
    (step6 / "optimizer" / "rank-1.safetensors").write_bytes(b"o")  # its .json not yet written: not finished
    assert latest_checkpoint(str(root), world=2) == (str(step3), 3)
    (step6 / "optimizer" / "rank-1.json").write_bytes(b"o")
    assert latest_checkpoint(str(root), world=2) == (str(step6), 6)
