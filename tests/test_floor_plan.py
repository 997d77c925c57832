"""The package's floor plan: no import cycle between its top-level parts, and the README's map tells the truth."""

from __future__ import annotations

import re

from helpers import REPO
from import_graph import cycles, part_graph

PACKAGE = REPO / "mtl"
MAP_HEADING = "## The package, floor by floor"


def readme_map() -> list[str]:
    """The parts the README's map lists, top floor first."""
    text = (REPO / "README.md").read_text()
    assert MAP_HEADING in text, f"README.md has no section {MAP_HEADING!r}"
    section = text.split(MAP_HEADING, 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `mtl/([a-z_]+)(?:\.py|/)` \|", section, re.M)]


def test_no_cycle_between_top_level_parts() -> None:
    graph = part_graph(PACKAGE)
    found = cycles(graph)
    detail = [
        f"{a} -> {b} ({', '.join(graph[a][b][:2])})" for comp in found for a in comp for b in graph[a] if b in comp
    ]
    assert not found, f"import cycles between parts of mtl/: {found}\n" + "\n".join(detail)


def test_the_graph_sees_lazy_imports_and_skips_type_checking(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import X\n"
        "def f():\n    from pkg import high\n"
    )
    (pkg / "high.py").write_text("from pkg.low.a import f\nfrom .other import g\n")
    (pkg / "other.py").write_text("")
    graph = part_graph(pkg)
    assert sorted(graph["high"]) == ["low", "other"]
    assert list(graph["low"]) == ["high"] and graph["low"]["high"] == ["pkg/low/a.py:5"]  # the lazy one only
    assert cycles(graph) == [["high", "low"]]


def test_readme_map_lists_every_part_in_floor_order() -> None:
    listed = readme_map()
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(listed) == sorted(parts), f"README map {listed} vs the package's parts {sorted(parts)}"
    graph = part_graph(PACKAGE)
    floor = {name: len(listed) - i for i, name in enumerate(listed)}  # the top line is the top floor
    upward = [f"{a} -> {b} ({graph[a][b][0]})" for a in graph for b in graph[a] if floor[b] >= floor[a]]
    assert not upward, "parts that import a part listed above them in README's map:\n" + "\n".join(upward)
