"""What the scripts that generate README tables share: a block between two markers, writing only
the files that changed (or, for the test suite, naming the stale ones), and the preset a result
record ran."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def with_block(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with everything between the ``begin`` and ``end`` markers replaced by ``block``."""
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {begin} … {end}")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1]


def recorded_preset(method: str, learned_rounding) -> str:
    """The preset a result record ran. Records from before the fast path got its own name say ``ours``
    without learned rounding (or without the field at all): that preset is ``ours-fast``."""
    return "ours-fast" if method == "ours" and not learned_rounding else method


def sync(outputs: dict[Path, str], check: bool, rerun: str, report: bool = False) -> int:
    """Write each file whose text differs from ``outputs``; with ``check`` write nothing, name the stale
    files with the command ``rerun`` that renews them, and return 1 if there are any."""
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in stale:
            print(f"{_shown(p)} is stale: run {rerun}", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(outputs[p])
        if report:
            print(f"wrote {_shown(p)}")
    return 0


def _shown(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
