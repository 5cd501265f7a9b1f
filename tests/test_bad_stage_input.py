"""Bad input past `prepare`: a missing, corrupt or mismatched stage input (item codes, tokens, samples from
another run, a model folder without weights or cut short, a checkpoint of another architecture, a top-K of
another dataset) ends in one line naming the file and field, exit 2, the stage's output as it was and no lock
left behind; --debug adds the traceback."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from launcher.cli import main
from tests.conftest import REPO
from tests.toy_run import build_toy_run, stage, tree

CONFIG = str(REPO / "configs" / "demo.yaml")
SEQUENCES = {str(u): [(u + k) % 12 for k in range(5)] for u in range(30)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared 30-user catalogue (run_dir/dataset only); each test works on its own copy."""
    root = tmp_path_factory.mktemp("bad_stage")
    (root / "raw").mkdir()
    (root / "raw" / "Toy.inter.json").write_text(json.dumps(SEQUENCES))
    assert main(["prepare", CONFIG, f"run_dir={root / 'run'}", f"data.path={root / 'raw'}", "data.name=Toy"]) == 0
    return root / "run"


@pytest.fixture()
def run_dir(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "run")


def _fails_cleanly(capsys, run_dir, argv, *needles, absent=()):
    assert main([argv[0], CONFIG, f"run_dir={run_dir}", *argv[1:]]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("recllm ")]
    assert len(lines) == 1 and lines[0].startswith(f"recllm {argv[0]}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for folder in absent:
        assert not (run_dir / folder).exists(), folder
    assert not (run_dir / ".lock").exists()
    return lines[0]


def test_train_without_item_ids(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["train"], str(run_dir / "item_ids" / "tokens.json"),
                   "run `recllm build-ids` first", absent=["model"])


def test_infer_without_a_model(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["infer"], str(run_dir / "model"), "run `recllm train` first", absent=["topk"])


def test_evaluate_without_a_topk(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["evaluate"], "topk/_SUCCESS", "run `recllm infer` first", absent=["report"])


def test_build_ids_semantic_without_a_baseline(run_dir, capsys):
    semantic = ["ids.scheme=semantic", "ids.user_tokens=true", "infer.scorer=beam"]
    _fails_cleanly(capsys, run_dir, ["build-ids", *semantic], str(run_dir / "baseline" / "manifest.json"),
                   "no baseline; run `recllm train-baseline` first", absent=["item_ids"])


def test_train_baseline_without_a_dataset(tmp_path, capsys):
    _fails_cleanly(capsys, tmp_path / "run", ["train-baseline"], "dataset/manifest.json", "run `recllm prepare` first",
                   absent=["baseline"])


def test_build_samples_without_item_ids(run_dir, capsys):
    _fails_cleanly(capsys, run_dir, ["build-samples"], "item_codes.parquet", "run `recllm build-ids` first",
                   absent=["samples"])


def test_build_samples_with_corrupt_item_codes(run_dir, capsys):
    (run_dir / "item_ids").mkdir()
    (run_dir / "item_ids" / "item_codes.parquet").write_bytes(b"PAR1 not really")
    _fails_cleanly(capsys, run_dir, ["build-samples"], "item_codes.parquet", "corrupt or unreadable Parquet",
                   absent=["samples"])


def test_build_ids_with_corrupt_items_table(run_dir, capsys):
    (run_dir / "dataset" / "items.parquet").write_bytes(b"truncated")
    _fails_cleanly(capsys, run_dir, ["build-ids", "ids.scheme=atomic"], "dataset/items.parquet",
                   "corrupt or unreadable Parquet", absent=["item_ids"])


def test_debug_adds_the_traceback(run_dir, capsys):
    assert main(["train", CONFIG, f"run_dir={run_dir}", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "training_inputs" in err
    assert err.rstrip().splitlines()[-1].startswith("recllm train: error: ")


def test_unknown_flag_prints_the_usage(run_dir, capsys):
    assert main(["train", CONFIG, f"run_dir={run_dir}", "--force"]) == 2
    assert capsys.readouterr().err.startswith("usage: recllm <command> CONFIG")


# ---------------------------------------------------------------------------------------------------------------
# Past build-samples: every input of train, infer and evaluate, checked before Ray starts. `built` is a toy run
# with dataset/, item_ids/, samples/ and an exported (untrained) model/, made once per module; each test breaks
# one thing in its own copy and checks that the stage refuses it in one line and leaves its output as it was.

LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("built"))


@pytest.fixture()
def run(built, tmp_path):
    return shutil.copytree(built, tmp_path / "run")


def _refused(capsys, command: str, run_dir, *overrides: str, needles=(), output: str) -> str:
    """Run the stage, expect exit 2 and one error line (log records aside) holding every needle, and
    run_dir/``output`` exactly as it was before (absent stays absent)."""
    folder = run_dir / output
    before = tree(folder) if folder.exists() else None
    capsys.readouterr()
    assert stage(command, run_dir, *overrides) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"recllm {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert (tree(folder) if folder.exists() else None) == before, f"{output} changed"
    assert not (run_dir / ".lock").exists()
    return lines[0]


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _checkpoint(run, tmp_path, edit=None):
    """A model.checkpoint folder: the run's exported model (the demo's tiny shape), ``edit``ed."""
    folder = shutil.copytree(run / "model", tmp_path / "checkpoint")
    if edit:
        edit(folder)
    return folder


# build-ids and build-samples

def test_build_ids_with_a_corrupt_dataset_manifest(run, capsys):
    (run / "dataset" / "manifest.json").write_text('{"counts": {"items": 12,')
    _refused(capsys, "build-ids", run, needles=["dataset/manifest.json, line 1: not valid JSON"], output="item_ids")


def test_build_ids_without_a_dataset(run, capsys):
    shutil.rmtree(run / "dataset")
    _refused(capsys, "build-ids", run, needles=["dataset/manifest.json", "run `recllm prepare` first"],
             output="item_ids")


def test_build_samples_with_item_codes_missing_a_column(run, capsys):
    codes = run / "item_ids" / "item_codes.parquet"
    pq.write_table(pq.read_table(codes).drop_columns(["tokens"]), codes)
    _refused(capsys, "build-samples", run, needles=["item_codes.parquet, field 'tokens': column missing"],
             output="samples")


def test_build_samples_with_item_codes_of_another_dataset(run, capsys):
    codes = run / "item_ids" / "item_codes.parquet"
    pq.write_table(pq.read_table(codes).slice(0, 8), codes)  # built on an 8-item catalogue
    _refused(capsys, "build-samples", run, needles=["item_codes.parquet", "8 rows for item_ids 0..11",
                                                    "rebuild item_ids/ from this dataset"], output="samples")


# train: item_ids/, samples/ and model.checkpoint, all before Ray starts

def test_train_with_item_codes_missing(run, capsys):
    (run / "item_ids" / "item_codes.parquet").unlink()
    _refused(capsys, "train", run, needles=["item_ids/item_codes.parquet", "run `recllm build-ids` first"],
             output="model")


def test_train_with_corrupt_item_codes(run, capsys):
    _truncate(run / "item_ids" / "item_codes.parquet")
    _refused(capsys, "train", run, needles=["item_codes.parquet", "corrupt or unreadable Parquet"], output="model")


def test_train_with_corrupt_tokens_json(run, capsys):
    (run / "item_ids" / "tokens.json").write_text('["<item_0>", "<item_1>"')
    _refused(capsys, "train", run, needles=["item_ids/tokens.json, line 1: not valid JSON"], output="model")


def test_train_with_tokens_json_from_another_build(run, capsys):
    tokens = json.loads((run / "item_ids" / "tokens.json").read_text())
    (run / "item_ids" / "tokens.json").write_text(json.dumps(tokens + ["<user_0>"]))
    _refused(capsys, "train", run, needles=["item_ids/tokens.json, field 'bytes'", "stats.json",
                                            "rerun `recllm build-ids`"], output="model")


def test_train_with_a_samples_shard_from_another_run(run, tmp_path, capsys):
    other = shutil.copytree(run, tmp_path / "other")
    assert stage("build-samples", other, "seed=1") == 0  # same data, another seed: shards shuffled otherwise
    shard = "samples/train/part-00000.parquet"
    assert (other / shard).read_bytes() != (run / shard).read_bytes()
    shutil.copyfile(other / shard, run / shard)
    _refused(capsys, "train", run, needles=[f"{shard}, field 'sha256'", "samples/manifest.json",
                                            "rerun `recllm build-samples`"], output="model")


def test_train_with_samples_older_than_item_ids(run, capsys):
    assert stage("build-ids", run, "ids.user_tokens=true") == 0  # item_ids rebuilt, samples not
    _refused(capsys, "train", run, needles=["samples/manifest.json, field 'item_ids'",
                                            "rerun `recllm build-samples`"], output="model")


def test_train_from_a_checkpoint_of_another_family(run, tmp_path, capsys):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 128}))
    (bert / "model.safetensors").write_bytes(b"")
    _refused(capsys, "train", run, f"model.checkpoint={bert}", needles=["model.checkpoint", "'bert' model"],
             output="model")


def test_train_from_a_checkpoint_of_another_shape(run, tmp_path, capsys):
    def narrower(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))

    ckpt = _checkpoint(run, tmp_path, narrower)
    _refused(capsys, "train", run, f"model.checkpoint={ckpt}",
             needles=[f"{ckpt / 'config.json'}, field 'hidden_size'", "not a tiny model: checkpoint 64"],
             output="model")


def test_train_from_a_checkpoint_without_weights(run, tmp_path, capsys):
    ckpt = _checkpoint(run, tmp_path, lambda folder: (folder / "model.safetensors").unlink())
    _refused(capsys, "train", run, f"model.checkpoint={ckpt}", needles=[str(ckpt), "no weights"], output="model")


def test_train_from_a_truncated_checkpoint(run, tmp_path, capsys):
    ckpt = _checkpoint(run, tmp_path, lambda folder: _truncate(folder / "model.safetensors"))
    _refused(capsys, "train", run, f"model.checkpoint={ckpt}",
             needles=[str(ckpt / "model.safetensors"), "truncated"], output="model")


# infer: run_dir/model and item_ids/, before Ray starts

def test_infer_with_a_model_folder_without_weights(run, capsys):
    (run / "model" / "model.safetensors").unlink()
    _refused(capsys, "infer", run, needles=[str(run / "model"), "no weights"], output="topk")


def test_infer_with_a_truncated_safetensors_file(run, capsys):
    _truncate(run / "model" / "model.safetensors", 0.9)
    _refused(capsys, "infer", run, needles=[str(run / "model" / "model.safetensors"), "truncated or damaged"],
             output="topk")


def test_infer_with_tokens_json_the_model_never_learned(run, capsys):
    assert stage("build-ids", run, "ids.user_tokens=true") == 0  # 30 <user_N> tokens the model has not got
    line = _refused(capsys, "infer", run, needles=["item_ids/tokens.json", "30 of its 42 tokens are not in the "
                                                   "vocabulary", "<user_0>"], output="topk")
    assert "trained on other item IDs" in line


def test_infer_with_a_model_of_another_architecture(run, capsys):
    config = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    _refused(capsys, "infer", run, needles=["model/config.json, field 'model_type'", "'bert' model"],
             output="topk")


def test_infer_with_item_codes_missing(run, capsys):
    (run / "item_ids" / "item_codes.parquet").unlink()
    _refused(capsys, "infer", run, needles=["item_ids/item_codes.parquet", "run `recllm build-ids` first"],
             output="topk")


def test_infer_with_corrupt_item_codes(run, capsys):
    (run / "item_ids" / "item_codes.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    _refused(capsys, "infer", run, needles=["item_codes.parquet", "corrupt or unreadable Parquet"], output="topk")


@pytest.mark.parametrize("fields, field, value", [
    ({"style": "chat", "max_history": 50}, "style", "'chat'"),
    ({"style": "sequence", "max_history": 50, "item_rerank": "popularity"}, "item_rerank", "'popularity'")])
def test_infer_with_an_unknown_prompt_format(run, capsys, fields, field, value):
    (run / "model" / "prompt_format.json").write_text(json.dumps(fields))
    _refused(capsys, "infer", run, needles=[f"model/prompt_format.json, field '{field}'", value], output="topk")


# evaluate: the top-K cache

def test_evaluate_with_a_corrupt_success_marker(run, capsys):
    (run / "topk").mkdir()
    (run / "topk" / "_SUCCESS").write_text('{"mode": "test", ')
    _refused(capsys, "evaluate", run, needles=["topk/_SUCCESS, line 1: not valid JSON"], output="report")


@pytest.fixture(scope="module")
def inferred(built, tmp_path_factory, ray_local):
    """A copy of ``built`` with the top-K of its test users, from a real `recllm infer`."""
    run_dir = shutil.copytree(built, tmp_path_factory.mktemp("inferred") / "run")
    assert stage("infer", run_dir) == 0
    return run_dir


@pytest.mark.integration
def test_evaluate_with_a_topk_from_another_dataset(inferred, tmp_path, capsys):
    # The same 30 user ids over other histories: the user check alone would let this cache through.
    other = build_toy_run(tmp_path, {u: seq[::-1] for u, seq in SEQUENCES.items()})
    shutil.copytree(inferred / "topk", other / "topk")
    _refused(capsys, "evaluate", other, needles=["topk/_SUCCESS, field 'dataset_sha256'", "another dataset",
                                                 "re-run `recllm infer`"], output="report")
    assert stage("evaluate", inferred) == 0  # on its own dataset it is fine


@pytest.mark.integration
def test_evaluate_with_a_nightly_topk(inferred, tmp_path, capsys):
    run_dir = shutil.copytree(inferred, tmp_path / "run")
    success = json.loads((run_dir / "topk" / "_SUCCESS").read_text())
    (run_dir / "topk" / "_SUCCESS").write_text(json.dumps({**success, "mode": "nightly"}))
    _refused(capsys, "evaluate", run_dir, needles=["topk/_SUCCESS, field 'mode'", "needs infer.mode=test"],
             output="report")
