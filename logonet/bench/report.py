"""``logonet bench report``: paste each benchmark's ``<name>.md`` verbatim into a document, between the markers
``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` (the prose around them is kept); ``<name>`` may name a
sub-folder (``bench:final/speed`` -> ``OUT/final/speed.md``). No number is typed by
hand: the tables come from the files the measuring sub-commands wrote.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Tuple

MARKER = re.compile(r"(<!-- bench:([\w.-]+(?:/[\w.-]+)*) -->\n)(.*?)(<!-- /bench:\2 -->)", re.S)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="docs/bench",
                        help="folder holding the benchmark .md files (default docs/bench)")
    parser.add_argument("--doc", default="docs/benchmarks.md",
                        help="document with the markers (default docs/benchmarks.md)")


def fill(text: str, folder: Path) -> Tuple[str, List[str], List[str]]:
    """``text`` with every marker block replaced by ``folder/<name>.md``; (new text, filled, missing)."""
    filled: List[str] = []
    missing: List[str] = []

    def replace(match: "re.Match[str]") -> str:
        source = folder / f"{match.group(2)}.md"
        if not source.is_file():
            missing.append(match.group(2))
            return match.group(0)
        filled.append(match.group(2))
        return match.group(1) + source.read_text(encoding="utf-8").rstrip() + "\n" + match.group(4)

    return MARKER.sub(replace, text), filled, missing


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..atomic import atomic_write

    doc = Path(args.doc)
    if not doc.is_file():
        raise UserError(f"{doc} does not exist; it needs <!-- bench:NAME --> ... <!-- /bench:NAME --> markers")
    text, filled, missing = fill(doc.read_text(encoding="utf-8"), Path(args.out))
    if not filled and not missing:
        raise UserError(f"{doc} has no <!-- bench:NAME --> ... <!-- /bench:NAME --> markers")
    with atomic_write(doc) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{doc}: filled {', '.join(filled) or 'nothing'}"
          + (f"; no results yet for {', '.join(missing)} (run logonet bench NAME --out {args.out})" if missing else ""))
    return 0
