"""The intent behind a query_alignment sample, cut from the item's own catalogue text (never invented).

Category: the leaf of the category path when the path has at least two levels (the root alone, e.g.
'Industrial & Scientific', says nothing). Key phrase: the title with a leading brand, bracketed text and model
codes (TRA708T, 541-774-21/2, a12081600ux0477, 740001201) removed, its clauses (split at , ; ' - ' ' | ') taken
until it has two words, first ``words`` words; without a title, the first sentence of the description.
Words are only ever dropped, so the phrase states nothing the catalogue does not.
"""

from __future__ import annotations

import re

_BRACKETED = re.compile(r"\([^)]*\)|\[[^\]]*\]|\{[^}]*\}")
_CLAUSE_BREAK = re.compile(r",|;| - | \| | – | — ")
_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def category_leaf(categories: str | None) -> str | None:
    if not categories:
        return None
    parts = [p.strip() for p in categories.split(",") if p.strip()]
    return parts[-1] if len(parts) >= 2 else None


def _is_model_code(word: str) -> bool:
    """Part numbers: digits with capitals or several hyphens, 4+ digits without letters, or letters and digits
    interleaved (a12081600ux0477)."""
    core = word.strip(".,;:!?\"'")
    digits = sum(c.isdigit() for c in core)
    if not digits:
        return False
    if len(core) >= 3 and not any(c.islower() for c in core) and (any(c.isupper() for c in core) or core.count("-") >= 2):
        return True  # SPP6, TRA708T, 541-774-21/2 (not 3D, 5V)
    if digits >= 4 and not any(c.isalpha() for c in core):
        return True  # 740001201, 11-1033 (not 1-1/4)
    runs = re.findall(r"[0-9]+|[A-Za-z]+", core)
    return len(runs) >= 4


def _first_words(text: str, words: int) -> str:
    kept = text.split()[:words]
    return " ".join(kept).strip(" .,;:-|&/")


def key_phrase(title: str | None, brand: str | None, description: str | None, words: int) -> str | None:
    """A short phrase naming what the item is, or None when the item has no usable text."""
    if title:
        text = _BRACKETED.sub(" ", title).strip()
        if brand and text.lower().startswith(brand.strip().lower() + " "):
            text = text[len(brand.strip()):]
        kept: list[str] = []
        for clause in _CLAUSE_BREAK.split(text):
            kept += [w for w in clause.split() if not _is_model_code(w)]
            if len(kept) >= 2:
                break
        phrase = _first_words(" ".join(kept), words)
        if phrase:
            return phrase
        # A title of only codes and brand: keep it as written rather than drop the item.
        fallback = _first_words(_BRACKETED.sub(" ", title), words)
        if fallback:
            return fallback
    if description:
        first = _SENTENCE_END.split(description.strip(), maxsplit=1)[0]
        phrase = _first_words(first, words)
        return phrase or None
    return None
