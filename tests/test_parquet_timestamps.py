"""Real Parquet logs (issue #27): what warehouses export, a TIMESTAMP column in any unit and time zone, dates,
integer epochs, and ID columns as int, string, large_string or dictionary, all prepare to the same sequences; a
string, negative or null timestamp is one line naming the row and field, exit 2, nothing written."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.cli import main
from tests.conftest import REPO

SECONDS = [1_600_000_000 + 86_400 * k + 7 * (k % 3) for k in range(12)]
USERS = [f"u{k % 3}" for k in range(12)]
ITEMS = [f"i{(5 * k) % 7}" for k in range(12)]
ORDER = [11, 3, 7, 0, 5, 9, 1, 8, 2, 6, 10, 4]  # rows out of time order: prepare sorts each user's by time


def _write(folder, stamps: pa.Array, users: pa.Array | None = None, items: pa.Array | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"user_id": users if users is not None else pa.array([USERS[i] for i in ORDER]),
                      "item_id": items if items is not None else pa.array([ITEMS[i] for i in ORDER]),
                      "timestamp": stamps})
    pq.write_table(table, folder / "interactions.parquet")


def _prepare(tmp_path, name: str) -> tuple[int, object]:
    run_dir = tmp_path / f"run-{name}"
    rc = main(["prepare", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", "data.format=parquet",
               f"data.path={tmp_path / name}", "data.num_shards=1"])
    return rc, run_dir


def _sequences(run_dir) -> dict:
    return {s: sorted(map(tuple, (r.values() for r in pq.read_table(run_dir / "dataset" / "sequences" / s)
                                  .to_pylist())), key=str) for s in ("train", "valid", "test")}


def _seconds() -> list[int]:
    return [SECONDS[i] for i in ORDER]


CASES = {
    "int_seconds": lambda: pa.array(_seconds(), pa.int64()),
    "int32_seconds": lambda: pa.array(_seconds(), pa.int32()),
    **{f"timestamp_{unit}": (lambda unit=unit, factor=factor: pa.array([s * factor for s in _seconds()], pa.int64())
                             .cast(pa.timestamp(unit)))
       for unit, factor in (("s", 1), ("ms", 1_000), ("us", 1_000_000), ("ns", 1_000_000_000))},
    "timestamp_us_tz": lambda: pa.array([dt.datetime.fromtimestamp(s, dt.timezone.utc) for s in _seconds()],
                                        pa.timestamp("us", tz="Europe/Berlin")),
}


def test_every_timestamp_type_prepares_to_the_same_sequences(tmp_path):
    results = {}
    for name, stamps in CASES.items():
        _write(tmp_path / name, stamps())
        rc, run_dir = _prepare(tmp_path, name)
        assert rc == 0, name
        results[name] = _sequences(run_dir)
    reference = results.pop("int_seconds")
    assert reference["test"] and all(r == reference for r in results.values())


@pytest.mark.parametrize("ids", ["large_string", "dictionary", "int"])
def test_id_columns_of_every_arrow_type(tmp_path, ids):
    _write(tmp_path / "ref", pa.array(_seconds(), pa.int64()))
    users = [USERS[i] for i in ORDER]
    items = [ITEMS[i] for i in ORDER]
    if ids == "large_string":
        u, i = pa.array(users, pa.large_string()), pa.array(items, pa.large_string())
    elif ids == "dictionary":
        u, i = pa.array(users).dictionary_encode(), pa.array(items).dictionary_encode()
    else:
        u, i = pa.array([int(x[1:]) for x in users]), pa.array([int(x[1:]) for x in items])
        _write(tmp_path / "ref", pa.array(_seconds(), pa.int64()), pa.array([str(x) for x in u.to_pylist()]),
               pa.array([str(x) for x in i.to_pylist()]))
    _write(tmp_path / ids, pa.array(_seconds(), pa.int64()), u, i)
    (rc_ref, ref), (rc, run) = _prepare(tmp_path, "ref"), _prepare(tmp_path, ids)
    assert rc_ref == rc == 0 and _sequences(run) == _sequences(ref)


@pytest.mark.parametrize("stamps, needle", [
    (pa.array(["2024-01-01"] * 12), "field 'timestamp': timestamp '2024-01-01' of type string"),
    (pa.array([-5] + [1] * 11, pa.int64()), "row 0, field 'timestamp': negative timestamp -5"),
    (pa.array([1, 2, None] + [3] * 9, pa.int64()), "row 2, field 'timestamp': null timestamp"),
])
def test_bad_timestamps_are_one_line_naming_row_and_field(tmp_path, capsys, stamps, needle):
    _write(tmp_path / "bad", stamps)
    rc, run_dir = _prepare(tmp_path, "bad")
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "interactions.parquet" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (run_dir / "dataset").exists()
