"""What `recllm --help` and `recllm <command> --help` print: each command with one line on what it reads and
writes, and the config sections a command uses, every field with its type, default and docstring (read from the
config dataclasses themselves, so the help never drifts from the schema). Imports no torch and no Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
import typing

from data_pipeline.config_schema import field_docs

COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prepare": ("raw data (data.path) -> run_dir/dataset/: canonical Parquet, the train/valid/test split", ("data",)),
    "train-baseline": ("dataset/ -> baseline/: the run's SASRec, early-stopped on valid", ("baseline",)),
    "build-ids": ("dataset/ (+ baseline/) -> item_ids/: item codes, new tokens, item text vectors",
                  ("ids", "text", "model")),
    "build-samples": ("dataset/ + item_ids/ -> samples/: training samples of the listed tasks", ("samples",)),
    "train": ("samples/ -> train/ and model/: Ray Train + DeepSpeed fine-tuning, best valid round exported",
              ("train", "model")),
    "infer": ("model/ + item_ids/ -> topk/: top-K items for every user (test or nightly)", ("infer",)),
    "evaluate": ("topk/ + baseline/ -> report/: HR/NDCG next to SASRec, most-popular and the content baseline",
                 ("eval",)),
    "plan": ("checks config, cluster shape and per-GPU memory; starts nothing", ("train", "model", "infer")),
    "pipeline": ("runs the config's stages in order", ("stages",)),
    "build-reviews": ("review logs -> domains/<d>/: rating/review rows per domain (LoID, ControlRec)", ("reviews",)),
    "train-loid": ("domains/ -> loid/<run>/: LoID's LoRA plugins and rating head", ("loid",)),
    "evaluate-loid": ("loid/ -> report/loid/: rating MSE/MAE per domain", ("loid",)),
    "build-review-samples": ("domains/ -> samples/: ControlRec's review tasks as SFT samples", ("review_tasks",)),
    "evaluate-reviews": ("model/ -> report/review_tasks/: ROUGE/BLEU of generated reviews", ("review_tasks",)),
    "submit": ("sends a command to a Ray cluster as a Ray Job (`recllm submit --help`)", ()),
    "config": ("prints the resolved config (file + overrides) as YAML", ()),
}
USAGE = "usage: recllm <command> CONFIG [key=value ...] [--break-lock] [--debug] [-v]"


def overview(version: str) -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"recllm {version}: LLaMA-family language models aligned with user/item IDs, as recommenders.", "",
             USAGE, "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (what, _) in COMMANDS.items()]
    lines += ["", "`recllm <command> --help` lists the config fields that command reads, with their docs.",
              "Every config field can be overridden as section.field=value (e.g. train.max_steps=50)."]
    return "\n".join(lines)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace("typing.", "")


def section_help(root_cls: type, section: str) -> list[str]:
    """`section.field  type = default` and its docstring, for every field of one section of ``root_cls``."""
    hints = typing.get_type_hints(root_cls)
    if section not in hints or not dataclasses.is_dataclass(hints[section]):
        doc = field_docs(root_cls).get(section, "")
        return [f"  {section}: {doc}"]
    cls = hints[section]
    lines = [f"{section}: {field_docs(root_cls).get(section, '')}"]
    docs, types = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        if dataclasses.is_dataclass(default):
            default = "{...}"
        lines.append(f"  {section}.{f.name}  {_type_name(types[f.name])} = {default!r}")
        lines += textwrap.wrap(docs.get(f.name, ""), 100, initial_indent="      ", subsequent_indent="      ")
    return lines


def command_help(root_cls: type, command: str) -> str:
    what, sections = COMMANDS[command]
    lines = [f"recllm {command} CONFIG [key=value ...]: {what}", ""]
    for section in ("run_dir", "seed", *sections):
        lines += section_help(root_cls, section)
    return "\n".join(lines)


def did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
