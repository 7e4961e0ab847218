"""The README's layout section names every source file there is, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

# folders whose every file the layout names (what a newcomer reads; data and build outputs are not listed)
LISTED_FOLDERS = ("instseg", "ray_jobs", "tuning", "flows", "bench", "configs", "cluster")
LISTED_SUFFIXES = {".py", ".yaml", ".sh", ".md"}
FILE_MENTION = re.compile(r"(?<![\w./`-])([\w-]+(?:/[\w-]+)*\.(?:py|yaml|sh|md))\b")
DESCRIPTION_COLUMN = 23  # entries sit in the first column or indented by two per level; descriptions start here


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def layout_paths() -> set[Path]:
    """Every file and folder the block names: its entries (a tree by indentation) and the files named in the
    descriptions, relative to the folder of the entry they describe."""
    named: set[Path] = set()
    folders: list[Path] = []  # the folder of each indentation level
    context = Path(".")
    for line in layout_block():
        indent = len(line) - len(line.lstrip(" "))
        if line.strip() and indent < DESCRIPTION_COLUMN:
            entry = line.split()[0]
            level = indent // 2
            parent = folders[level - 1] if level else Path(".")
            path = parent / entry.rstrip("/")
            named.add(path)
            del folders[level:]
            if entry.endswith("/"):
                folders.append(path)
                context = path
            else:
                context = parent
            description = line[indent + len(entry) :]
        else:
            description = line
        named.update(context / mention for mention in FILE_MENTION.findall(description))
    return named


def test_every_path_the_layout_names_exists():
    missing = sorted(str(path) for path in layout_paths() if not (ROOT / path).exists())
    assert not missing, f"the README's layout names what is not there: {missing}"


def test_every_source_file_is_in_the_layout():
    named = layout_paths()
    unlisted = sorted(
        str(path.relative_to(ROOT))
        for folder in LISTED_FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and path.suffix in LISTED_SUFFIXES
        and path.name != "__init__.py"
        and "__pycache__" not in path.parts
        and path.relative_to(ROOT) not in named
    )
    assert not unlisted, f"files the README's layout does not name: {unlisted}"
    assert {Path(folder) for folder in LISTED_FOLDERS} <= named


def test_the_layout_parser_reads_nesting_and_descriptions():
    named = layout_paths()
    assert Path("instseg/data/coco.py") in named  # named in the description of instseg/data/
    assert Path("instseg/cli.py") in named and Path("instseg/__main__.py") in named
    assert Path("cluster/kuberay/rayjob.yaml") in named and Path("tests/helpers.py") in named
