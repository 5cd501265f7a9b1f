"""SASRec text: one 'user item' pair per line, 1-based integer IDs, each user's lines in time order."""

from __future__ import annotations

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.raw import RawDataset, interactions_frame


def read(cfg: DataConfig) -> RawDataset:
    name = cfg.name or "data"
    candidates = [storage.join(cfg.path, f"{name}.txt")] + storage.list_files(cfg.path, ".txt")
    uri = next((c for c in candidates if storage.exists(c)), None)
    if uri is None:
        raise DataError(storage.join(cfg.path, f"{name}.txt"), "file not found (format sasrec expects <name>.txt)")
    users, items, positions = [], [], []
    next_pos: dict[str, int] = {}
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2:
            raise DataError(uri, f"expected 'user item', got {line!r}", row=f"line {lineno}")
        for field, value in (("user", parts[0]), ("item", parts[1])):
            if not value.lstrip("-").isdigit():
                raise DataError(uri, f"{field} ID {value!r} is not an integer", row=f"line {lineno}", field=field)
        user, item = str(int(parts[0])), str(int(parts[1]))
        users.append(user)
        items.append(item)
        positions.append(next_pos.get(user, 0))
        next_pos[user] = positions[-1] + 1
    return RawDataset(interactions_frame(users, items, positions), None, source_files=[uri])
