"""Where a bench's numbers go: `<stem>.json` (the whole record) beside `<stem>.md` (the same, for people).

Invariant: a section that starts with `NOTES` at the end of an existing `<stem>.md` was written by hand and is
kept, unchanged, at the end of the rewritten file; everything before it is regenerated on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = "\n## Notes (written by hand, kept across runs)\n"


def write_record(out_dir: Path, stem: str, record: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `record` as `<stem>.json` and `markdown` as `<stem>.md` in `out_dir` (made if missing);
    returns (md, json). Values json cannot encode (paths, dates) are written as their str()."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = out_dir / f"{stem}.md"
    old = md.read_text() if md.exists() else ""
    md.write_text(markdown + (old[old.index(NOTES) :] if NOTES in old else ""))
    return md, js
