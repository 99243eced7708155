"""Write the code map of docs/code-map.md from the module docstrings of src/elbox.

Usage: python scripts/code_map.py [--check]

It walks src/elbox as it is now (every .py file, packages included: no list of modules is kept anywhere), takes the
first sentence of each module's docstring, and writes the list, grouped by package, between the two marker lines of
docs/code-map.md; the text around the markers is left as it is. A module without a docstring is an error that names
the file: write its docstring, then run this again. With --check it writes nothing and exits 1 when the page is out
of date. tests/test_code_map.py checks that the committed page equals what this script writes.

It reads the files with `ast`: nothing is imported, so it runs without torch.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "elbox"
PAGE = ROOT / "docs" / "code-map.md"
BEGIN = "<!-- code-map: written by scripts/code_map.py from the module docstrings; do not edit by hand -->"
END = "<!-- /code-map -->"

# The page as first written, when docs/code-map.md does not exist yet; afterwards only the marked region changes.
NEW_PAGE = f"""# Code map

{BEGIN}
{END}
"""


ABBREVIATIONS = {"e.g.", "i.e.", "al.", "cf.", "vs.", "etc.", "resp.", "approx.", "fig.", "eq."}


class MissingDocstring(Exception):
    """A module has no docstring, so the map has nothing true to say about it."""


def modules(package: Path = PACKAGE) -> list[Path]:
    """Every .py file under the package, found on disk now (caches left out), in map order: by folder, and in a
    folder `__init__.py` first, then the rest by name."""
    found = [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(found, key=lambda p: (p.parent.relative_to(package).parts, p.name != "__init__.py", p.name))


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line. A full stop ends a sentence only outside
    parentheses and `code`, before a space, and not after an abbreviation or before a number ("et al. 2021", "e.g.
    x" and "elbox.cli" go on); a paragraph that ends in a colon (a formula follows it) ends with a full stop."""
    paragraph = docstring.strip().split("\n\n")[0]
    paragraph = " ".join(re.sub(r"(?<=\w-)\n\s*", "", paragraph).split())  # a word hyphenated at a line end is one word
    depth, in_code = 0, False
    for i, char in enumerate(paragraph):
        if char == "`":
            in_code = not in_code
        elif in_code:
            continue
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif char in ".!?" and depth == 0:
            rest, word = paragraph[i + 1 :], paragraph[: i + 1].split()[-1]
            if rest == "" or (rest[0].isspace() and word.lower() not in ABBREVIATIONS and not rest[1].isdigit()):
                return paragraph[: i + 1]
    return re.sub(r":$", ".", paragraph)


def shown(path: Path) -> str:
    """A path as messages show it: from the repository root where it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def summary(path: Path) -> str:
    """The first sentence of the module's docstring; MissingDocstring when it has none."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    if not docstring or not docstring.strip():
        raise MissingDocstring(
            f"{shown(path)} has no module docstring: the code map takes each module's "
            "first sentence from it. Write one (what the module is for, in one sentence), then "
            "run `python scripts/code_map.py`."
        )
    return first_sentence(docstring)


def render(package: Path = PACKAGE, page: Path = PAGE) -> str:
    """The Markdown between the markers: one section per package (folder), one line per module, each linked."""
    root = page.parent.parent  # the repository: links are relative to the page's folder

    def link(path: Path) -> str:
        return (Path("..") / path.relative_to(root)).as_posix()

    lines: list[str] = []
    folder = None
    for path in modules(package):
        if path.parent != folder:
            folder = path.parent
            dotted = ".".join((package.name, *folder.relative_to(package).parts))
            lines += [""] if lines else []
            lines += [f"### [`{dotted}`]({link(folder)}/)", ""]
        lines.append(f"- [`{path.name}`]({link(path)}): {summary(path)}")
    return "\n".join(lines)


def updated(text: str, region: str) -> str:
    """The page's text with the region between its markers replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{PAGE.relative_to(ROOT)}: expected one line `{BEGIN}` and, after it, one `{END}`")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    return f"{before}{BEGIN}\n{region}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page is out of date")
    args = parser.parse_args(argv)
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else NEW_PAGE
    try:
        text = updated(current, render())
    except MissingDocstring as e:
        print(f"code_map: error: {e}", file=sys.stderr)
        return 1
    if args.check:
        if text != current:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run `python scripts/code_map.py`", file=sys.stderr)
            return 1
        return 0
    if text != current:
        PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {PAGE.relative_to(ROOT)} ({len(modules())} modules)")
    else:
        print(f"{PAGE.relative_to(ROOT)} is up to date ({len(modules())} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
