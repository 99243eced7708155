"""The code map (docs/code-map.md) is what scripts/code_map.py writes from the module docstrings, so every module of
src/elbox is listed with its own first sentence; and every relative link of the user documents resolves: README.md,
docs/*.md and the benchmark pages point at files (and headings) that exist."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_code_map():
    spec = importlib.util.spec_from_file_location("code_map", ROOT / "scripts" / "code_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


code_map = load_code_map()


# -- the code map ---------------------------------------------------------------------------------------------------


def test_the_committed_code_map_is_what_the_script_writes():
    page = code_map.PAGE.read_text(encoding="utf-8")
    expected = code_map.updated(page, code_map.render())
    assert page == expected, (
        "docs/code-map.md is out of date with the module docstrings under src/elbox (a module was added, moved, "
        "renamed or removed, or its docstring's first sentence changed): run `python scripts/code_map.py` and "
        "commit docs/code-map.md"
    )


def test_every_module_is_listed_once():
    page = code_map.PAGE.read_text(encoding="utf-8")
    listed = re.findall(r"^- \[`[^`]+`\]\(\.\./(src/elbox/[^)]+\.py)\): ", page, re.MULTILINE)
    on_disk = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "src" / "elbox").rglob("*.py") if "__pycache__" not in p.parts
    )
    assert sorted(listed) == on_disk, "run `python scripts/code_map.py`"
    assert len(on_disk) > 20  # the walk found the package


def test_the_generator_walks_the_tree_it_is_given(tmp_path):
    """Modules are found on disk (a package added later is listed, in its own section), and each line is its
    docstring's first sentence."""
    package = tmp_path / "src" / "pkg"
    (package / "io").mkdir(parents=True)
    (package / "__init__.py").write_text('"""The package. More text."""\n')
    (package / "b.py").write_text('"""Second, by Kingma et al. 2021 (see e.g. x). It goes on."""\n')
    (package / "a.py").write_text('"""First: a formula follows\nbelow, written out:\n\n    x = y\n"""\n')
    (package / "io" / "__init__.py").write_text('"""Files: atomic\nwrites, run-\ndirectories."""\nimport os\n')
    (package / "io" / "disk.py").write_text("'''Disk! then more.'''\n")
    text = code_map.render(package, tmp_path / "docs" / "code-map.md")
    assert text == "\n".join(
        [
            "### [`pkg`](../src/pkg/)",
            "",
            "- [`__init__.py`](../src/pkg/__init__.py): The package.",
            "- [`a.py`](../src/pkg/a.py): First: a formula follows below, written out.",
            "- [`b.py`](../src/pkg/b.py): Second, by Kingma et al. 2021 (see e.g. x).",
            "",
            "### [`pkg.io`](../src/pkg/io/)",
            "",
            "- [`__init__.py`](../src/pkg/io/__init__.py): Files: atomic writes, run-directories.",
            "- [`disk.py`](../src/pkg/io/disk.py): Disk!",
        ]
    )


@pytest.mark.parametrize("source", ["import os\n", '"""   """\n', "# a comment, not a docstring\nx = 1\n"])
def test_a_module_without_a_docstring_is_an_error_that_names_it(tmp_path, source):
    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""The package."""\n')
    (package / "silent.py").write_text(source)
    with pytest.raises(code_map.MissingDocstring, match=r"silent\.py has no module docstring"):
        code_map.render(package, tmp_path / "docs" / "code-map.md")


def test_the_region_outside_the_markers_is_kept():
    page = "# Title\n\nIntro.\n\n" + code_map.BEGIN + "\nold\n" + code_map.END + "\n\nAfter.\n"
    assert (
        code_map.updated(page, "new")
        == "# Title\n\nIntro.\n\n" + code_map.BEGIN + "\nnew\n" + code_map.END + "\n\nAfter.\n"
    )


# -- links ------------------------------------------------------------------------------------------------------------

DOCUMENTS = sorted(
    {
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "benchmarks" / "results").glob("*.md"),
    }
)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked (their brackets are not links)."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lowercased, punctuation dropped, spaces to hyphens, a repeated
    heading numbered (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.MULTILINE):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
        slug = "".join(c for c in plain.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(without_code(path.read_text(encoding="utf-8")))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)
    ]  # http:, https:, mailto: are not checked here


def test_the_documents_are_found():
    names = {str(p.relative_to(ROOT)) for p in DOCUMENTS}
    assert {"README.md", "docs/guide.md", "docs/code-map.md", "benchmarks/README.md"} <= names, names
    assert len(relative_links(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path):
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_anchors_are_githubs():
    doc = ROOT / "docs" / "guide.md"
    assert "speed-threads-compilation-precision-memory-layout" in anchors(doc)
