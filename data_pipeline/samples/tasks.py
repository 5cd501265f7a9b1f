"""The four alignment tasks as functions from dataset rows to (prompt, response) samples; build_samples writes them.

Every task draws its template per sample (and the negative task its negatives) from its own seeded generator,
so turning one task on or off leaves the samples of the others unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from data_pipeline.samples.intent_queries import category_leaf, key_phrase
from data_pipeline.samples.prompt_templates import PromptTemplate

ITEM_SEPARATOR = ", "


@dataclass
class SequenceRows:
    """Rows of sequences/<split>, in a fixed order (user, then as written)."""

    user_ids: np.ndarray
    histories: list[list[int]]
    targets: np.ndarray


@dataclass
class ItemText:
    """Catalogue text per dense item_id (None where missing)."""

    titles: list[str | None]
    descriptions: list[str | None]
    brands: list[str | None]
    categories: list[str | None]

    @property
    def has_text(self) -> bool:
        return any(t is not None for t in self.titles) or any(d is not None for d in self.descriptions)


@dataclass
class TaskSamples:
    """The samples of one task, in generation order (the order sample_ids number)."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    user_ids: list[int | None] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, prompt: str, response: str, user_id: int | None, item_id: int) -> None:
        self.prompts.append(prompt)
        self.responses.append(response)
        self.user_ids.append(user_id)
        self.item_ids.append(item_id)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def __len__(self) -> int:
        return len(self.prompts)


def _bar(iterable, desc: str, total: int):
    return tqdm(iterable, desc=desc, total=total, unit="row", dynamic_ncols=True, mininterval=2.0)


def render_items(item_names: list[str], items) -> str:
    return ITEM_SEPARATOR.join(item_names[i] for i in items)


def sequential_samples(rows: SequenceRows, item_names: list[str], user_names: list[str],
                       templates: list[PromptTemplate], rng: np.random.Generator | None, max_history: int,
                       desc: str = "samples: sequential") -> TaskSamples:
    """History (last ``max_history`` items) -> next item. ``rng`` None always uses the first template (valid)."""
    out = TaskSamples()
    n = len(rows.targets)
    picks = rng.integers(0, len(templates), size=n) if rng is not None else np.zeros(n, int)
    rows_iter = zip(rows.user_ids.tolist(), rows.histories, rows.targets.tolist(), picks.tolist())
    for user, history, target, pick in _bar(rows_iter, desc, n):
        prompt, response = templates[pick].render(user=user_names[user], item=item_names[target],
                                                  history=render_items(item_names, history[-max_history:]))
        out.add(prompt, response, user, target)
    return out


def cut_words(text: str, words: int) -> str:
    parts = text.split()
    return text if len(parts) <= words else " ".join(parts[:words]) + " ..."


def text_alignment_samples(text: ItemText, item_names: list[str], templates: dict[str, list[PromptTemplate]],
                           rng: np.random.Generator, max_description_words: int) -> TaskSamples:
    """Per item with text: item -> title, title -> item, description -> item (each where the field exists)."""
    out = TaskSamples()
    for item, (title, description) in _bar(enumerate(zip(text.titles, text.descriptions)),
                                           "samples: text_alignment", len(text.titles)):
        if title is None and description is None:
            out.skip("item without title or description")
            continue
        name = item_names[item]
        if title is not None:
            for variant in ("item_to_title", "title_to_item"):
                ts = templates[variant]
                out.add(*ts[int(rng.integers(len(ts)))].render(item=name, title=title), None, item)
        if description is not None:
            ts = templates["description_to_item"]
            cut = cut_words(description, max_description_words)
            out.add(*ts[int(rng.integers(len(ts)))].render(item=name, description=cut), None, item)
    return out


def query_alignment_samples(text: ItemText, item_names: list[str], templates: dict[str, list[PromptTemplate]],
                            rng: np.random.Generator, phrase_words: int) -> TaskSamples:
    """Per item with text: an intent sentence cut from its title/categories (see intent_queries) -> the item."""
    out = TaskSamples()
    rows = zip(text.titles, text.brands, text.descriptions, text.categories)
    for item, (title, brand, description, categories) in _bar(enumerate(rows), "samples: query_alignment",
                                                               len(text.titles)):
        phrase = key_phrase(title, brand, description, phrase_words)
        if phrase is None:
            out.skip("item without title or description")
            continue
        category = category_leaf(categories)
        ts = templates["with_category" if category else "without_category"]
        out.add(*ts[int(rng.integers(len(ts)))].render(item=item_names[item], phrase=phrase, category=category),
                None, item)
    return out


def sample_negatives(rng: np.random.Generator, interacted: frozenset[int], num_items: int, k: int) -> list[int] | None:
    """``k`` distinct items drawn uniformly from those not in ``interacted``; None when fewer than ``k`` exist."""
    if num_items - len(interacted) < k:
        return None
    if len(interacted) > num_items // 2:
        free = np.setdiff1d(np.arange(num_items), np.fromiter(interacted, np.int64, len(interacted)))
        return rng.choice(free, size=k, replace=False).tolist()
    chosen: list[int] = []
    while len(chosen) < k:  # rejection: accepted draws are uniform over the free items, without replacement
        for item in rng.integers(0, num_items, size=2 * (k - len(chosen))).tolist():
            if item not in interacted and item not in chosen:
                chosen.append(item)
                if len(chosen) == k:
                    break
    return chosen


def negative_samples(rows: SequenceRows, item_names: list[str], user_names: list[str],
                     interacted: dict[int, frozenset[int]], num_items: int, templates: list[PromptTemplate],
                     rng: np.random.Generator, ratio: int, max_history: int) -> TaskSamples:
    """Per train row: history + ``ratio`` never-interacted items named as not of interest -> the actual next item."""
    out = TaskSamples()
    for user, history, target in _bar(zip(rows.user_ids.tolist(), rows.histories, rows.targets.tolist()),
                                      "samples: negative", len(rows.targets)):
        negatives = sample_negatives(rng, interacted.get(user, frozenset()), num_items, ratio)
        if negatives is None:
            out.skip(f"user with fewer than {ratio} items never interacted with")
            continue
        pick = int(rng.integers(len(templates)))
        out.add(*templates[pick].render(user=user_names[user], history=render_items(item_names, history[-max_history:]),
                                        negatives=render_items(item_names, negatives), item=item_names[target]),
                user, target)
    return out


def user_documents(rows: SequenceRows) -> dict[int, list[int]]:
    """Per user, the longest train row's history + target: every train interaction, in order."""
    docs: dict[int, list[int]] = {}
    for user, history, target in zip(rows.user_ids.tolist(), rows.histories, rows.targets.tolist()):
        if len(history) + 1 > len(docs.get(user, ())):
            docs[user] = list(history) + [target]
    return docs


def collaborative_lm_samples(rows: SequenceRows, item_names: list[str], user_names: list[str],
                             templates: list[PromptTemplate], rng: np.random.Generator,
                             max_items: int) -> TaskSamples:
    """CLLM4Rec's collaborative LM: per user, '{user} has interacted with' -> their train items (last
    ``max_items``) written as item tokens with no separator, so the main text is item tokens only."""
    out = TaskSamples()
    docs = user_documents(rows)
    joiner = item_joiner(item_names)
    for user, items in _bar(sorted(docs.items()), "samples: collaborative_lm", len(docs)):
        items = items[-max_items:]
        pick = int(rng.integers(len(templates)))
        out.add(*templates[pick].render(user=user_names[user], items=joiner.join(item_names[i] for i in items)),
                user, items[-1])
    return out


def item_joiner(item_names: list[str]) -> str:
    """How a run of items is written when the text is items only: token names (<item_3>, <a_1><b_7>) run
    together, so every token of the text is an item token; names the tokenizer splits keep a separator."""
    return "" if all(n.startswith("<") and n.endswith(">") for n in item_names[:100]) else ITEM_SEPARATOR


def user_sequence_samples(rows: SequenceRows, item_names: list[str], max_items: int) -> TaskSamples:
    """The sequence-level task: per user, their last ``max_items`` train items as the whole response with an
    empty prompt, so the loss covers every item of the sequence, teacher-forced, as SASRec is trained."""
    out = TaskSamples()
    docs = user_documents(rows)
    joiner = item_joiner(item_names)
    for user, items in _bar(sorted(docs.items()), "samples: user_sequence", len(docs)):
        items = items[-max_items:]
        out.add("", joiner.join(item_names[i] for i in items), user, items[-1])
    return out


def content_lm_samples(text: ItemText, reviews: list[tuple[int, int, str]], item_names: list[str],
                       user_names: list[str], templates: dict[str, list[PromptTemplate]], rng: np.random.Generator,
                       max_words: int) -> TaskSamples:
    """CLLM4Rec's content LM: item content token -> its title and description; and, where the data has review
    text, user + item content tokens -> the review (``reviews``: train interactions only)."""
    out = TaskSamples()
    for item, (title, description) in _bar(enumerate(zip(text.titles, text.descriptions)), "samples: content_lm",
                                           len(text.titles)):
        body = ". ".join(t for t in (title, description) if t)
        if not body:
            out.skip("item without title or description")
            continue
        ts = templates["item_text"]
        out.add(*ts[int(rng.integers(len(ts)))].render(item=item_names[item], text=cut_words(body, max_words)),
                None, item)
    ts = templates["user_review"]
    for user, item, review in reviews:
        out.add(*ts[int(rng.integers(len(ts)))].render(user=user_names[user], item=item_names[item],
                                                       review=cut_words(review, max_words)), user, item)
    return out
