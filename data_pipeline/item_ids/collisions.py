"""Collision counting and resolution for fixed-length codes (semantic, precomputed schemes; cold start).

The best-priority item of a shared sequence keeps it; the others take the nearest free last-level code under
their own prefix (vectorised rounds; the better item wins a contested code), and only where a prefix is full
fall back to a depth-first search that backs off a level. No extra level is appended: every item keeps L codes.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class CodePreference(Protocol):
    """How much an item likes each code: the scheme's notion of distance."""

    def nearest_last_codes(self, rows: np.ndarray, k: int) -> np.ndarray:
        """[len(rows), k]: the k most preferred last-level codes under each row's own prefix, best first."""

    def ranked_codes(self, row: int, prefix: np.ndarray) -> np.ndarray:
        """Every code of level len(prefix) for ``row`` placed under ``prefix``, best first."""


def pack_codes(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """[N, L] codes -> one int64 key per row; level 0 most significant, so a prefix is a contiguous key range."""
    levels = codes.shape[1]
    if num_codes ** levels >= 2 ** 62:
        raise ValueError(f"{num_codes}^{levels} code sequences do not fit a 62-bit key")
    keys = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(levels):
        keys = keys * num_codes + codes[:, level].astype(np.int64)
    return keys


def collision_counts(codes: np.ndarray, num_codes: int) -> dict:
    """duplicate_codes: items beyond the first in each shared sequence; colliding_items: items in a shared one."""
    if len(codes) == 0:
        return {"items": 0, "distinct_codes": 0, "duplicate_codes": 0, "colliding_items": 0, "collision_rate": 0.0}
    _, counts = np.unique(pack_codes(codes, num_codes), return_counts=True)
    duplicates = int(len(codes) - len(counts))
    return {"items": int(len(codes)), "distinct_codes": int(len(counts)), "duplicate_codes": duplicates,
            "colliding_items": int(counts[counts > 1].sum()), "collision_rate": duplicates / len(codes)}


def _last_level_rounds(keys: np.ndarray, placed: np.ndarray, waiting: np.ndarray, preference: CodePreference,
                       num_codes: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``waiting`` rows (best priority first) free last-level codes under their prefix, in rounds.

    Returns (rows placed, their new keys); rows left out need the depth-first fallback.
    """
    group_keys, group = np.unique(keys[waiting] // num_codes, return_inverse=True)
    taken = np.zeros((len(group_keys), num_codes), dtype=bool)
    placed_prefix = keys[placed] // num_codes
    pos = np.searchsorted(group_keys, placed_prefix).clip(max=len(group_keys) - 1)
    hit = group_keys[pos] == placed_prefix
    taken[pos[hit], keys[placed][hit] % num_codes] = True
    prefs = preference.nearest_last_codes(waiting, min(candidates, num_codes))
    pointer = np.zeros(len(waiting), dtype=np.int64)
    new_code = np.full(len(waiting), -1, dtype=np.int64)
    active = np.flatnonzero(pointer < prefs.shape[1])
    while len(active):
        code = prefs[active, pointer[active]]
        free = ~taken[group[active], code]
        proposers = active[free]
        cells = group[proposers] * num_codes + code[free]
        # ``waiting`` is in priority order, so the first proposer of each cell is the best one.
        first = np.unique(cells, return_index=True)[1]
        winners = proposers[first]
        new_code[winners] = prefs[winners, pointer[winners]]
        taken[group[winners], new_code[winners]] = True
        pointer[active] += 1
        active = active[(new_code[active] < 0) & (pointer[active] < prefs.shape[1])]
    done = new_code >= 0
    return waiting[done], keys[waiting[done]] // num_codes * num_codes + new_code[done]


class _Occupancy:
    """How many items hold a code under each prefix: sorted keys placed so far plus those added one by one."""

    def __init__(self, placed_keys: np.ndarray, levels: int, num_codes: int):
        self.sorted_keys = np.sort(placed_keys)
        self.levels, self.num_codes = levels, num_codes
        self.added: dict[tuple[int, int], int] = {}
        self.added_last: dict[int, list[int]] = {}

    def is_full(self, depth: int, prefix_key: int) -> bool:
        """Whether every sequence starting with the ``depth`` codes packed in ``prefix_key`` is taken."""
        span = self.num_codes ** (self.levels - depth)
        lo, hi = np.searchsorted(self.sorted_keys, [prefix_key * span, (prefix_key + 1) * span])
        return int(hi - lo) + self.added.get((depth, prefix_key), 0) >= span

    def taken_last_codes(self, prefix_key: int) -> np.ndarray:
        """Bool [C]: last-level codes already held under the first L-1 codes packed in ``prefix_key``."""
        lo, hi = np.searchsorted(self.sorted_keys, [prefix_key * self.num_codes, (prefix_key + 1) * self.num_codes])
        taken = np.zeros(self.num_codes, dtype=bool)
        taken[self.sorted_keys[lo:hi] % self.num_codes] = True
        taken[self.added_last.get(prefix_key, [])] = True
        return taken

    def add(self, codes: np.ndarray) -> None:
        key = 0
        for depth in range(1, self.levels + 1):
            key = key * self.num_codes + int(codes[depth - 1])
            self.added[(depth, key)] = self.added.get((depth, key), 0) + 1
        self.added_last.setdefault(key // self.num_codes, []).append(int(codes[-1]))


def _depth_first(row: int, original: np.ndarray, preference: CodePreference, occupancy: _Occupancy
                 ) -> np.ndarray | None:
    """Nearest free sequence for ``row`` in its preference order, original codes first; None if all are taken."""
    levels, num_codes = occupancy.levels, occupancy.num_codes
    path: list[int] = []

    def on_original_path(depth: int) -> bool:
        return path == [int(c) for c in original[:depth]]

    def candidates(depth: int):
        # Lazy: while the original code is free at this level no ranking is computed.
        first = int(original[depth]) if on_original_path(depth) else None
        if first is not None:
            yield first
        for code in preference.ranked_codes(row, np.asarray(path, dtype=np.int64)):
            if code != first:
                yield int(code)

    def descend(depth: int, prefix_key: int) -> bool:
        if depth == levels - 1:  # one vectorised look at the prefix's free last codes
            ranked = preference.ranked_codes(row, np.asarray(path, dtype=np.int64))
            if on_original_path(depth):
                ranked = np.concatenate([[original[depth]], ranked[ranked != original[depth]]])
            free = ranked[~occupancy.taken_last_codes(prefix_key)[ranked]]
            if len(free):
                path.append(int(free[0]))
            return bool(len(free))
        for code in candidates(depth):
            key = prefix_key * num_codes + code
            if occupancy.is_full(depth + 1, key):
                continue
            path.append(code)
            if descend(depth + 1, key):
                return True
            path.pop()
        return False

    return np.asarray(path, dtype=np.int64) if descend(0, 0) else None


def resolve_collisions(codes: np.ndarray, num_codes: int, preference: CodePreference, priority: np.ndarray,
                       frozen: np.ndarray | None = None, candidates: int = 16) -> tuple[np.ndarray, dict]:
    """Unique code sequences for every row of ``codes`` [N, L]; returns (codes, report).

    ``priority``: lower keeps a contested sequence (ties: lower row). ``frozen`` rows never move (they win
    every contest; two frozen rows sharing a sequence is an error). ``candidates``: last-level codes each
    moved row tries in the vectorised rounds before the depth-first fallback.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n, levels = codes.shape
    priority = np.asarray(priority, dtype=np.float64)
    frozen = np.zeros(n, bool) if frozen is None else np.asarray(frozen, bool)
    keys = pack_codes(codes, num_codes)
    order = np.lexsort((np.arange(n), priority, ~frozen, keys))
    first_of_group = np.ones(n, bool)
    first_of_group[1:] = keys[order][1:] != keys[order][:-1]
    keepers, displaced = order[first_of_group], order[~first_of_group]
    if frozen[displaced].any():
        row = int(displaced[frozen[displaced]][0])
        raise ValueError(f"row {row}: two frozen rows share the code sequence {codes[row].tolist()}")
    displaced = displaced[np.lexsort((displaced, priority[displaced]))]
    resolved_keys = keys.copy()
    fallback = displaced
    if len(displaced):
        moved, moved_keys = _last_level_rounds(keys, keepers, displaced, preference, num_codes, candidates)
        resolved_keys[moved] = moved_keys
        fallback = displaced[~np.isin(displaced, moved)]
    resolved = codes.copy()
    for level in range(levels):
        resolved[:, levels - 1 - level] = (resolved_keys // num_codes ** level) % num_codes
    if len(fallback):
        placed = np.ones(n, bool)
        placed[fallback] = False
        occupancy = _Occupancy(resolved_keys[placed], levels, num_codes)
        for row in fallback:
            path = _depth_first(int(row), codes[row], preference, occupancy)
            if path is None:
                raise ValueError(f"all {num_codes}^{levels} code sequences are taken; raise codes or levels")
            occupancy.add(path)
            resolved[row] = path
    moved_above_last = int((resolved[displaced, :-1] != codes[displaced, :-1]).any(axis=1).sum())
    report = {"reassigned_items": int(len(displaced)), "reassigned_by_depth_first_search": int(len(fallback)),
              "reassigned_above_last_level": moved_above_last}
    return resolved, report
