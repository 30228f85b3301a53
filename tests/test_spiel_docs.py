"""docs/METHOD.md has a section (or a numbered item of §10.2) for every § number the code cites."""
from __future__ import annotations

import re

from conftest import REPO

#: The reference spec's file name, which lives outside the repository (built from parts so that this test
#: does not itself name it as a citation).
_OUTSIDE_SPEC = "SPIEL" + "_SPEC"
_CITE = re.compile(r"(?:METHOD\.md|spec) §(\d+(?:\.\d+)*)|^\s*[-*]?\s*§(\d+(?:\.\d+)*)[:,]", re.M)


def _cited() -> set[str]:
    found = set()
    for folder in ("spiel", "spielbench", "baselines", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for m in _CITE.finditer(path.read_text(encoding="utf-8")):
                found.add((m.group(1) or m.group(2)).rstrip("."))
    return found


def test_every_cited_section_exists_in_method_md():
    text = (REPO / "docs" / "METHOD.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    items = set(re.findall(r"^(\d+)\. ", text.split("### 10.2", 1)[1].split("### 10.3", 1)[0], re.M))
    cited = _cited()
    assert {"2", "2.2", "3", "3.3", "4.3", "5.1", "6", "7", "8.5"} <= cited  # the scan sees the citations
    missing = sorted(c for c in cited if c not in headings
                     and not (c.startswith("10.2.") and c.split(".")[2] in items))
    assert not missing, f"cited but not in docs/METHOD.md: {missing}"


def test_no_citation_points_outside_the_repository():
    """Docstrings cite docs/METHOD.md, never the spec file that a clone does not have."""
    outside = [str(p.relative_to(REPO)) for folder in ("spiel", "spielbench", "baselines", "benchmarks", "workflow")
               for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".smk")
               and _OUTSIDE_SPEC in p.read_text(encoding="utf-8")]
    assert not outside, f"these files cite the spec outside the repository: {outside}"
