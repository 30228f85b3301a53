"""spielbench.notebook: papermill's parameter injection, the checks before it, the atomic executed copy
and the command line (a real kernel runs a two-cell notebook)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from spielbench.errors import InputError
from spielbench.notebook import (INJECTED_TAG, NotebookExecutionError, check_parameters, execute_notebook,
                                 inject_parameters, main)


def _notebook(with_parameters_cell: bool = True):
    nb = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_markdown_cell("x")]
    if with_parameters_cell:
        p = nbformat.v4.new_code_cell("results_dir = 'results'\nn = 1")
        p.metadata["tags"] = ["parameters"]
        cells.append(p)
    cells.append(nbformat.v4.new_code_cell("print(results_dir, n)"))
    nb.cells = cells
    return nb


def test_parameters_are_injected_after_the_parameters_cell_by_papermill():
    nb = inject_parameters(_notebook(), {"results_dir": "elsewhere", "n": 3, "ratio": float("nan"),
                                         "names": ("a", Path("b"))})
    cell = nb.cells[2]
    assert cell.metadata["tags"] == [INJECTED_TAG] and "tags" not in nb.cells[0].metadata
    assert cell.source.splitlines() == ["# Parameters injected by spielbench.notebook",
                                        'results_dir = "elsewhere"', "n = 3", "ratio = float('nan')",
                                        'names = ["a", "b"]']
    assert nb.metadata["papermill"]["parameters"]["n"] == 3
    nb = inject_parameters(nb, {"results_dir": "again"})
    injected = [c for c in nb.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    assert len(injected) == 1 and injected[0].source.splitlines()[1:] == ['results_dir = "again"']
    assert len(nb.cells) == 4
    nb = inject_parameters(_notebook(with_parameters_cell=False), {"n": 2})
    assert INJECTED_TAG in nb.cells[0].metadata["tags"]  # no parameters cell: the injected cell goes first


@pytest.mark.parametrize("params, match", [
    ({"x": object()}, r"'x'.*not a plain literal"),
    ({"x": [1, {2: "a"}]}, r"'x'.*not a plain literal"),
    ({"not valid": 1}, "identifier"),
])
def test_bad_parameters_are_refused_before_papermill(params, match):
    with pytest.raises(InputError, match=match):
        check_parameters(params)
    with pytest.raises(InputError, match=match):
        inject_parameters(_notebook(), params)


def test_executed_copy_holds_the_injected_values(tmp_path):
    src = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(), src)
    out = execute_notebook(src, tmp_path / "out" / "executed.ipynb", {"results_dir": tmp_path / "r", "n": 5},
                           timeout=60)
    nb = nbformat.read(out, as_version=4)
    assert nb.cells[-1].outputs[0]["text"] == f"{tmp_path / 'r'} 5\n"
    assert out.read_text().endswith("}\n") and not list(out.parent.glob(".*.tmp"))
    assert nbformat.read(src, as_version=4).cells[1].source.startswith("results_dir = 'results'")


def test_cli_exit_statuses(tmp_path, capsys):
    src = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(), src)
    dest = tmp_path / "executed.ipynb"
    assert main([str(src), str(dest), "-p", "n=7", "-p", "results_dir=here", "--timeout", "60"]) == 0
    assert json.loads(dest.read_text())["metadata"]["papermill"]["parameters"] == {"n": 7, "results_dir": "here"}
    assert main([str(src), str(dest), "-p", "novalue"]) == 2
    assert "error: -p 'novalue': expected name=value" in capsys.readouterr().err
    bad = tmp_path / "bad.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, bad)
    assert main([str(bad), str(dest), "--timeout", "60"]) == 1
    assert "cell 0 failed" in capsys.readouterr().err
    assert json.loads(dest.read_text())["metadata"]["papermill"]["parameters"]["n"] == 7  # untouched
    with pytest.raises(NotebookExecutionError):
        execute_notebook(bad, dest, timeout=60)
