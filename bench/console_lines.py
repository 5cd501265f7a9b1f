"""Count a captured console's lines the way a user reads them: each progress bar is one line however often it
redraws (Ray forwards every redraw of a worker's bar as a line of its own), every other line counts.

    make demo 2>&1 | tee demo.log; python bench/console_lines.py demo.log [--limit 35]

Prints the count, the lines counted, and exits 1 above --limit (#27: at most 35 lines for `make demo`).
"""

from __future__ import annotations

import argparse
import re
import sys

RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\([^)]*pid=\d+[^)]*\)(\x1b\[0m)? ?")
BAR = re.compile(r"^(?P<desc>[^|\r\n]*?):\s+\d+%\|")


def console_lines(text: str) -> list[str]:
    counted: list[str] = []
    bars: set[str] = set()
    for raw in text.split("\n"):
        line = RAY_PREFIX.sub("", raw.split("\r")[-1] if raw.strip("\r") else raw).rstrip()
        if not line.strip():
            continue  # an empty line Ray prints before each forwarded redraw
        bar = BAR.match(line)
        if bar:
            if bar["desc"] not in bars:
                bars.add(bar["desc"])
                counted.append(line)
            continue
        counted.append(line)
    return counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--limit", type=int, default=35)
    args = parser.parse_args()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        lines = console_lines(f.read())
    for line in lines:
        print(f"  {line[:160]}")
    print(f"{len(lines)} console lines besides progress redraws (limit {args.limit})")
    return 0 if len(lines) <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
