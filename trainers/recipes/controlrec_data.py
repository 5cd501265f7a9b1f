"""The side data ControlRec's objective draws from run_dir each step: item names and descriptions (HFM),
train sequences (history -> next item's description), the instruction bank (ICL) and the train interaction
graph (visibility matrix). Read once per worker from dataset/ and item_ids/; train split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline import storage
from data_pipeline.run_layout import RunLayout
from data_pipeline.samples.item_rendering import clean_text, item_names, user_names
from data_pipeline.samples.prompt_templates import load_instruction_bank
from data_pipeline.samples.tasks import ITEM_SEPARATOR, cut_words
from trainers.recipes.visibility import EntityIndex, InteractionGraph


@dataclass
class HFMTexts:
    id_texts: list[str]
    description_texts: list[str]
    history_texts: list[str]
    next_description_texts: list[str]

    def all_texts(self) -> list[str]:
        return self.id_texts + self.description_texts + self.history_texts + self.next_description_texts


@dataclass
class ICLTexts:
    anchors: list[str]
    positives: list[str]
    negatives: list[list[str]]

    def all_texts(self) -> list[str]:
        return self.anchors + self.positives + [t for row in self.negatives for t in row]


class ControlRecData:
    def __init__(self, names: list[str], descriptions: list[str | None], histories: list[list[int]],
                 targets: list[int], users: list[int], user_names_: list[str] | None, window: int, max_history: int):
        self.names, self.descriptions, self.max_history = names, descriptions, max_history
        self.with_text = np.array([i for i, d in enumerate(descriptions) if d], dtype=np.int64)
        rows = [r for r, t in enumerate(targets) if descriptions[t] and histories[r]]
        self.histories = [histories[r] for r in rows]
        self.targets = np.array([targets[r] for r in rows], dtype=np.int64)
        self.bank = load_instruction_bank()
        self.bank_tasks = sorted(self.bank)
        self.graph = InteractionGraph([h + [t] for h, t in zip(histories, targets)], users, window)
        self.entities = EntityIndex(names, user_names_)

    @classmethod
    def load(cls, run_dir: str, cfg, max_history: int) -> "ControlRecData":
        layout = RunLayout(run_dir)
        items = storage.read_parquet(layout.items).sort_by("item_id")
        codes = storage.read_parquet(layout.item_codes)
        names = item_names(codes, items.num_rows, layout.item_codes)
        titles, descriptions = clean_text(items.column("title")), clean_text(items.column("description"))
        text = [cut_words(". ".join(x for x in (t, d) if x), cfg.description_words) if (t or d) else None
                for t, d in zip(titles, descriptions)]
        train = layout.read_sequences("train")
        unames = None
        if storage.exists(layout.user_codes):
            num_users = storage.read_parquet(layout.users, columns=["user_id"]).num_rows
            unames = user_names(storage.read_parquet(layout.user_codes), num_users)
        return cls(names, text, train.column("history").to_pylist(), train.column("target").to_pylist(),
                   train.column("user_id").to_pylist(), unames, cfg.visibility_window, max_history)

    def hfm_texts(self, rng: np.random.Generator, batch: int) -> HFMTexts:
        """``batch`` distinct items (ID vs description) and ``batch`` train rows with distinct next items."""
        items = rng.choice(self.with_text, size=min(batch, len(self.with_text)), replace=False)
        rows: list[int] = []
        seen: set[int] = set()
        for r in rng.permutation(len(self.targets))[:batch * 8].tolist():
            if int(self.targets[r]) not in seen:
                seen.add(int(self.targets[r]))
                rows.append(r)
                if len(rows) == len(items):
                    break
        items = items[:len(rows)]
        history = [ITEM_SEPARATOR.join(self.names[i] for i in self.histories[r][-self.max_history:]) for r in rows]
        return HFMTexts([self.names[i] for i in items.tolist()], [self.descriptions[i] for i in items.tolist()],
                        history, [self.descriptions[int(self.targets[r])] for r in rows])

    def icl_texts(self, rng: np.random.Generator, anchors: int, negatives: int) -> ICLTexts:
        """Per anchor: a task, two distinct paraphrases of it, ``negatives`` instructions of other tasks."""
        a_out, p_out, n_out = [], [], []
        for _ in range(anchors):
            task = self.bank_tasks[int(rng.integers(len(self.bank_tasks)))]
            i, j = rng.choice(len(self.bank[task]), size=2, replace=False)
            others = [t for t in self.bank_tasks if t != task]
            negs = []
            for _ in range(negatives):
                other = others[int(rng.integers(len(others)))]
                negs.append(self.bank[other][int(rng.integers(len(self.bank[other])))])
            a_out.append(self.bank[task][i])
            p_out.append(self.bank[task][j])
            n_out.append(negs)
        return ICLTexts(a_out, p_out, n_out)
