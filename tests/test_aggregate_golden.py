"""The aggregation regenerates every table, claim, raw copy and figure input byte for byte from frozen run
JSONs (``tests/data/aggregate/<case>/``; see ``tests/aggregate_golden.py`` for how the golden files were made).
"""
from __future__ import annotations

import pytest

import aggregate_golden as golden


@pytest.mark.parametrize("case", golden.CASES)
def test_outputs_are_byte_identical_to_golden(case, tmp_path):
    golden.render(case, tmp_path)
    new, old = golden.files_under(tmp_path), golden.files_under(golden.DATA / case / "golden")
    assert sorted(new) == sorted(old)
    differ = [name for name in sorted(old) if new[name] != old[name]]
    assert differ == [], f"{case}: regenerated files differ from the golden ones: {differ}"
    # the comparison covers what matters: the tables in three formats, claims, raw copies, figure inputs
    assert {f"results/tables/{s}.{f}" for s in ("main", "quantized", "efficiency") for f in ("md", "csv", "tex")} \
        | {"results/claims.md", "results/runs/index.json", "figure_data.json", "combined/claims.md"} <= set(old)


def test_golden_comparison_detects_a_changed_number(tmp_path):
    """One changed input value changes the outputs (the comparison is not vacuous)."""
    import json
    import shutil

    case = tmp_path / "case"
    shutil.copytree(golden.DATA / "smoke", case, ignore=shutil.ignore_patterns("golden"))
    ev = case / "runs" / "lora-r2" / "eval.json"
    data = json.loads(ev.read_text())
    data["heldout"]["loss"] += 0.001
    ev.write_text(json.dumps(data))
    out = tmp_path / "out"
    golden.render("case", out, data=tmp_path)
    new, old = golden.files_under(out), golden.files_under(golden.DATA / "smoke" / "golden")
    differ = {name for name in old if new.get(name) != old[name]}
    assert {"results/tables/main.md", "results/tables/main.csv", "results/runs/lora-r2/eval.json",
            "figure_data.json"} <= differ
    assert "results/runs/spiel-ag-r2/eval.json" not in differ
