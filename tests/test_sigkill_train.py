"""SIGKILL chaos for train, export included, in the style of test_sigkill_chaos.py, on the toy run (30 users,
12 items, the demo config's sequence objective; 6 steps, a valid round and a checkpoint every 3).

The toy run's untrained model/ is the previous complete output. `recllm train` runs once uninterrupted on a
copy (the reference), then is started again and SIGKILLed twice: at a seeded random point while it trains, and
the moment its export stages the new model/ (a kill mid-export); then run to the end. After every kill model/
is the previous one byte for byte and nothing else is visible in run_dir; the final run's model/ equals the
reference byte for byte (training is deterministic), recllm_model.json apart from nothing. Bounded: 4 runs of
about 30-60 s on the session's Ray.
"""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest

from tests.test_sigkill_readers import _kill, _leftovers, _run, _start, _visible
from tests.toy_run import build_toy_run, tree

pytestmark = pytest.mark.integration

SEED = 18
TRAIN = ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1",
         "train.eval_users=30", "train.patience=10", "train.seq_len=64", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("sigkill_train"))


def _export_staged(run_dir):
    def staged():
        return any(p.name.startswith(".model.tmp-") for p in run_dir.iterdir())
    staged.__doc__ = "the export's staged model/"
    return staged


def test_sigkilled_train_leaves_the_previous_model_and_reruns_identically(built, ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "runs.log"
    ref_dir = shutil.copytree(built, tmp_path / "ref")
    seconds = _run("train", ref_dir, log, *TRAIN, ray_address=address)
    reference = tree(ref_dir / "model")
    assert json.loads(reference["recllm_model.json"])["step"] in (3, 6)  # the best valid round's

    run_dir = shutil.copytree(built, tmp_path / "run")
    previous = tree(run_dir / "model")
    before_visible = _visible(run_dir)
    rng = random.Random(SEED)
    kills = [(rng.uniform(0.4, 0.8) * seconds, lambda: False), (None, _export_staged(run_dir))]
    landed = []
    for delay, trigger in kills:
        t0 = time.monotonic()
        where = _kill(_start("train", run_dir, log, *TRAIN, "--break-lock", ray_address=address), delay, trigger)
        landed.append(where)
        print(f"train: uninterrupted {seconds:.1f}s, killed after {time.monotonic() - t0:.1f}s "
              f"({'at the staged export' if delay is None else f'at {delay:.1f}s'}): {where}")
        assert where != "after it finished", log.read_text()[-3000:]
        if where == "before writing" and tree(run_dir / "model") != previous:
            where = "after publishing"  # published and exiting when the kill came (a busy box stretches that)
            assert tree(run_dir / "model") == reference
        else:
            assert tree(run_dir / "model") == previous, f"train killed {where}: model/ changed"
        assert _visible(run_dir) <= before_visible | {"train"}, _visible(run_dir)
    assert landed[-1] == "mid-write", landed  # the export's staged folder existed when the kill came
    print(f"train: the final run took {_run('train', run_dir, log, *TRAIN, '--break-lock', ray_address=address):.1f}s")
    assert tree(run_dir / "model") == reference
    assert [p for p in _leftovers(run_dir) if not p.startswith("train/")] == []
    assert not (run_dir / ".lock").exists()
