"""A disk that fills up during the model export that ends `recllm train` (trainers/export_model.py, which train
calls on its final checkpoint). The weights are written by safetensors' own code, not through fsspec, so the
full disk is injected there: half the file is written, then OSError(ENOSPC). The export must raise the
project's WriteError naming run_dir/model (which the CLI prints as one line, exit 2), leave the previous model
folder byte for byte as it was and no temporary behind; with room again it exports."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from data_pipeline.errors import WriteError
from launcher.cli import _is_user_error
from launcher.config import load_config
from tests.toy_run import CONFIG, build_toy_run, tree


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_run(tmp_path_factory.mktemp("disk_full_export"))


def _weights(run_dir: Path, tmp_path: Path) -> Path:
    """A checkpoint's weights file as train leaves it: the model's state dict in one safetensors file."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(run_dir / "model" / "model.safetensors"))
    state = {k: v + 0.5 for k, v in state.items()}  # other weights than the previous export's
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    return path


def test_full_disk_during_the_model_export_keeps_the_previous_model(built, tmp_path, monkeypatch):
    import json

    import transformers.modeling_utils as hf
    from safetensors.torch import save_file

    from trainers.export_model import export_weights

    run_dir = shutil.copytree(built, tmp_path / "run")
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", "model.new_token_init=mean"])
    tokens = json.loads((run_dir / "item_ids" / "tokens.json").read_text())
    weights = _weights(run_dir, tmp_path)
    state = {"step": 7, "lora": False}
    previous = tree(run_dir / "model")

    refused = []

    def full_disk(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # what fitted
        refused.append(filename)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "safe_save_file", full_disk)
    with pytest.raises(WriteError) as caught:
        export_weights(cfg, weights, state, tokens)
    assert refused and ".model.tmp-" in refused[0]  # it failed while writing the staged folder
    message = str(caught.value)
    assert _is_user_error(caught.value) and "\n" not in message  # the CLI's one line, exit 2
    assert message.startswith(f"{run_dir}/model: cannot write: No space left on device [ENOSPC]"), message
    assert message.endswith(f"nothing was published, {run_dir}/model is as it was"), message
    assert tree(run_dir / "model") == previous
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []

    monkeypatch.undo()  # room again
    export_weights(cfg, weights, state, tokens)
    exported = tree(run_dir / "model")
    assert exported != previous and json.loads(exported["recllm_model.json"])["step"] == 7
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
