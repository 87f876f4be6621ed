#!/usr/bin/env python3
"""Lengths of every function in ``logonet/`` (lines from ``def`` to its last line, decorators and docstring
included), measured with ``ast``. Prints the longest ones; exits 1 when any is longer than the limit.

    python scripts/function_lengths.py [--limit 60] [--top 5] [ROOT]
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import List, Tuple

LIMIT = 60


def function_lengths(root: Path) -> List[Tuple[int, str]]:
    """``(lines, "path:line qualified.name")`` for every function and method under ``root``, longest first."""
    found: List[Tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        stack: List[Tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                        found.append((child.end_lineno - first + 1, f"{path}:{child.lineno} {name}"))
                    stack.append((child, f"{name}."))
                else:
                    stack.append((child, prefix))
    return sorted(found, key=lambda item: (-item[0], item[1]))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent / "logonet"))
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    lengths = function_lengths(Path(args.root))
    too_long = [(n, where) for n, where in lengths if n > args.limit]
    for n, where in too_long:
        print(f"TOO LONG ({n} > {args.limit}): {where}")
    print(f"longest {args.top} of {len(lengths)} functions:")
    for n, where in lengths[:args.top]:
        print(f"  {n:4d}  {where}")
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
