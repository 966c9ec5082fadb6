"""How much of transformers hf_slim depends on: lines adapted from transformers, private transformers names used.

* **Adapted lines**: the source lines of every function in ``hf_slim/`` and ``patches/`` whose comment block says
  ``Adapted from transformers`` (the forwards and generation internals copied and changed), per file. A comment that
  also says ``Used up to X.Y`` marks code that only older releases run (the installed one routes that family through
  its attention interface): it is counted apart, as kept for older releases, when the installed transformers is
  newer than X.Y.
* **Private names**: identifiers starting with one underscore that hf_slim uses (attribute accesses, imported names,
  names of methods it patches given as strings) and that the installed transformers *defines* (``def _x``,
  ``class _x``, ``self._x = ...``, ``_x = ...``), with the files that use them.

Both are what a transformers release can break without notice: fewer is cheaper to port.

    python scripts/transformers_surface.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from packaging.version import Version

PRIVATE = re.compile(r"^_[A-Za-z]\w*$")


def sources(root: Path) -> list[Path]:
    return sorted([*(root / "hf_slim").rglob("*.py"), *(root / "patches").rglob("*.py")])


USED_UP_TO = re.compile(r"Used up to (\d+\.\d+)")


def adapted_lines(path: Path, installed: Version | None = None) -> tuple[int, int]:
    """Lines of the functions whose preceding comment block names transformers as their source: ``(run by the
    installed release, kept only for older releases)`` (all of them in the first where ``installed`` is None)."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    total, older = 0, 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1  # 0-based first line
        comments = []
        above = start - 1
        while above >= 0 and lines[above].lstrip().startswith("#"):
            comments.append(lines[above])
            above -= 1
        if any("Adapted from transformers" in comment for comment in comments):
            count = node.end_lineno - node.lineno + 1
            limit = USED_UP_TO.search(" ".join(comment.lstrip("# ") for comment in reversed(comments)))
            if installed is not None and limit and installed.release[:2] > Version(limit.group(1)).release[:2]:
                older += count
            else:
                total += count
    return total, older


def used_private_names(path: Path) -> set[str]:
    """Single-underscore identifiers the file reads as attributes, imports, or names as strings (patched methods)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and PRIVATE.match(node.attr):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            names |= {alias.name for alias in node.names if PRIVATE.match(alias.name)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE.match(node.value):
            names.add(node.value)
    return names


def defined_by(package: Path) -> set[str]:
    """Single-underscore names the package's source defines (functions, classes, attributes, module globals)."""
    pattern = re.compile(r"(?:def|class)\s+(_[A-Za-z]\w*)|self\.(_[A-Za-z]\w*)\s*[:=]|^(_[A-Za-z]\w*)\s*[:=]", re.M)
    names = set()
    for path in package.rglob("*.py"):
        for match in pattern.finditer(path.read_text(errors="ignore")):
            names.add(next(group for group in match.groups() if group))
    return names


def defined_here(root: Path) -> set[str]:
    return defined_by(root / "hf_slim") | defined_by(root / "patches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    root = parser.parse_args().root
    files = sources(root)
    print(f"# {root} against transformers {transformers.__version__}")
    installed = Version(transformers.__version__)
    adapted = {path.relative_to(root): adapted_lines(path, installed) for path in files}
    run, older = sum(count for count, _ in adapted.values()), sum(count for _, count in adapted.values())
    print(
        f"\nlines adapted from transformers: {run} run by transformers {installed}, "
        f"{older} more kept for older releases"
    )
    for path, (count, kept) in sorted(adapted.items()):
        if count or kept:
            print(f"  {count:4d}  {path}" + (f"  (+ {kept} for older releases)" if kept else ""))
    theirs, ours = defined_by(Path(transformers.__file__).parent), defined_here(root)
    theirs -= set(dir(torch.nn.Module())) | set(vars(torch.nn.Module()))  # torch's own (``_modules``, ...)
    users = defaultdict(set)
    for path in files:
        for name in used_private_names(path) & theirs:
            if name not in ours or name in theirs:  # a name both define counts: hf_slim may be reading theirs
                users[name].add(path.stem)
    shared = sorted(name for name in users if name not in ours)
    both = sorted(name for name in users if name in ours)
    print(f"\nprivate transformers names used: {len(shared)} (+ {len(both)} that hf_slim also defines itself)")
    for name in shared:
        print(f"  {name:40s} {', '.join(sorted(users[name]))}")
    if both:
        print("  also defined by hf_slim (review: " + ", ".join(both) + ")")


if __name__ == "__main__":
    main()
