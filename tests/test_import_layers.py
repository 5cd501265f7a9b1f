"""Layers point down: every import of every project module (inside functions too) goes to its own layer or a
lower one. The layers, lowest first (README, "Architecture"):

1 config leaf      the config scheme (dataclass loading, overrides, ConfigError); imports nothing of the project
2 storage          local / s3:// files, DataError, the run layout (every path under run_dir and the readers of
                   its shared tables), the run_dir lock, the files of run_dir/baseline/
3 data             importers, the canonical dataset, item IDs, samples, reviews, the streaming reader
4 models           LM builders and tokenizer loading, SASRec, the LoID modules, and ranking/: what scores a model
                   in one process (constrained beam search, the multinomial head, the top-K scorer, ranking metrics)
5 train / infer /  the stages that drive them: Ray training (objectives, packing, validation rounds, export), the
  evaluate         baseline's training, Ray inference (inference/), evaluation and reports
6 CLI              `recllm`, the composed config, the stage table, `recllm submit`

A module's layer is that of the longest prefix in LAYERS that names it or a package above it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipeline", "trainers", "ranking", "inference", "launcher", "cluster")
"""bench/ and tests/ sit outside the layers: they may import anything."""

LAYERS = {
    "data_pipeline.config_schema": 1,
    "data_pipeline.storage": 2,
    "data_pipeline.errors": 2,
    "data_pipeline.run_layout": 2,
    "data_pipeline.run_lock": 2,
    "data_pipeline.baseline_files": 2,
    "data_pipeline": 3,
    "trainers.models": 4,
    "trainers.model_config": 4,
    "trainers.safetensors_slices": 4,  # reads slices of a checkpoint file: pure torch, no DeepSpeed
    "trainers.vocabulary": 4,  # ID tokens into a model's vocabulary and their rows
    "trainers.sharded_build": 4,  # the port a distributed trainer fills for the builders (ZeRO-3)
    "trainers.lora_adapters": 4,
    "trainers.lm_text_embedder": 4,
    "trainers.sasrec": 4,
    "trainers.sasrec_config": 4,
    "trainers.matrix_factorization": 4,
    "trainers.loid": 4,
    "trainers.assets": 4,
    "ranking": 4,
    "trainers": 5,
    "trainers.loid.objective": 5,
    "trainers.loid.evaluate": 5,
    "inference": 5,
    "launcher": 6,
    "cluster": 6,
}
NAMES = {1: "config", 2: "storage", 3: "data", 4: "models", 5: "train/infer/evaluate", 6: "CLI"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the layered packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, project module) of every import in the file, at any depth; ``from a import b`` names a.b when
    b is a module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base))
    return sorted({(line, name) for line, name in found if name.split(".")[0] in PACKAGES})


def upward_imports() -> list[str]:
    modules = project_modules()
    problems = []
    for module, path in modules.items():
        own = layer_of(module)
        for line, target in imported_modules(module, path, set(modules)):
            if layer_of(target) > own:
                problems.append(f"{path.relative_to(REPO)}:{line}: {module} ({own} {NAMES[own]}) imports {target} "
                                f"({layer_of(target)} {NAMES[layer_of(target)]})")
    return problems


def test_every_module_has_a_layer():
    for module in project_modules():
        assert layer_of(module) in NAMES, module


def test_no_import_points_up_a_layer():
    problems = upward_imports()
    assert not problems, "imports that point up a layer:\n" + "\n".join(problems)


def import_circles() -> list[list[str]]:
    """Every set of project modules that import each other round (Tarjan's strongly connected components of the
    graph of every import, inside functions and under TYPE_CHECKING too), each sorted."""
    modules = project_modules()
    graph = {m: {t for _, t in imported_modules(m, p, set(modules)) if t in modules and t != m}
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(part) > 1:
                circles.append(sorted(part))

    for module in graph:
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle():
    circles = import_circles()
    assert not circles, "modules that import each other round:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_finder_sees_a_circle(monkeypatch):
    """A ring through an import inside a function is found (the finder can fail)."""
    fake = {"trainers.a": Path("a.py"), "trainers.b": Path("b.py")}
    sources = {"a.py": "def f():\n    from trainers import b\n", "b.py": "from trainers.a import f\n"}
    monkeypatch.setattr(sys.modules[__name__], "project_modules", lambda: fake)
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: sources[self.name])
    assert import_circles() == [["trainers.a", "trainers.b"]]


def test_layers_are_whole_packages_for_ranking_and_inference():
    """The scorer that training and inference share lives in its own package, not as exceptions inside inference/."""
    assert not [name for name in LAYERS if name.startswith(("ranking.", "inference."))]


def test_training_imports_nothing_of_inference():
    """Training and inference meet in ranking/ (layer 4), not by one stage package importing the other."""
    modules = project_modules()
    found = [f"{module} imports {target}" for module, path in modules.items() if module.startswith("trainers")
             for _, target in imported_modules(module, path, set(modules)) if target.split(".")[0] == "inference"]
    assert not found, found


def test_the_config_leaf_imports_nothing_of_the_project():
    leaf = [m for m in project_modules() if layer_of(m) == 1]
    assert leaf == ["data_pipeline.config_schema"]
    modules = project_modules()
    assert imported_modules(leaf[0], modules[leaf[0]], set(modules)) == []


@pytest.mark.parametrize("source, line, expected", [
    ("import os\n\ndef f():\n    from inference.evaluate import run_evaluate\n", 4, "inference.evaluate"),
    ("from inference import evaluate\n", 1, "inference.evaluate"),
    ("import launcher.cli\n", 1, "launcher.cli"),
])
def test_the_walk_sees_imports_at_any_depth(tmp_path, source, line, expected):
    """The checker itself: an import inside a function counts, and `from pkg import module` names the module."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imported_modules("data_pipeline.probe", path, set(project_modules())) == [(line, expected)]
    assert layer_of(expected) > layer_of("data_pipeline.probe")
