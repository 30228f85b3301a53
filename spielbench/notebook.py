"""Execute a Jupyter notebook headlessly (nbclient + nbformat), with injected parameters.

The pipeline's ``figures`` rule runs ``analysis/figures.ipynb`` through :func:`execute_notebook`, so
the figures in ``results/figures/`` are always drawn by the notebook a reader opens, from the data the
pipeline just wrote (no jupyter command-line tool is needed).

Parameters are injected the way papermill does it: the notebook marks one code cell with the tag
``parameters`` (its assignments are the defaults); a new cell tagged ``injected-parameters`` is
inserted right after it, assigning the given values. Without a tagged cell the injected cell goes
first.

Command line::

    python -m spielbench.notebook SOURCE.ipynb EXECUTED.ipynb [-p name=value ...] [--cwd DIR]

``value`` is parsed as a Python literal when it is one (``3``, ``0.5``, ``None``, ``'x'``), else kept
as a string.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from spielbench.errors import InputError
from spielbench.fsio import atomic_write

#: Tag of the notebook cell that holds the parameter defaults.
PARAMETERS_TAG = "parameters"
#: Tag of the cell this module inserts with the given values.
INJECTED_TAG = "injected-parameters"


class NotebookExecutionError(RuntimeError):
    """A notebook cell raised while executing. The message names the cell and the exception.

    Attributes:
        cell_index: 0-based index of the failing cell in the executed notebook.
        failed_copy: path of the partly executed notebook written for inspection (or None).
    """

    def __init__(self, message: str, cell_index: int | None = None, failed_copy: Path | None = None):
        super().__init__(message)
        self.cell_index = cell_index
        self.failed_copy = failed_copy


def _literal_ok(value) -> bool:
    """True when ``repr(value)`` evaluates back to an equal value (plain literals and containers)."""
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def parameters_source(parameters: dict) -> str:
    """The source of the injected cell: one ``name = repr(value)`` line per parameter.

    Raises:
        InputError: a name is not a Python identifier, or a value is not a plain literal
            (str, int, float, bool, None, or lists/tuples/dicts of those).
    """
    lines = ["# Parameters injected by spielbench.notebook"]
    for name, value in parameters.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise InputError(f"notebook parameter {name!r}: expected a Python identifier as the name")
        if isinstance(value, Path):
            value = str(value)
        if not _literal_ok(value):
            raise InputError(
                f"notebook parameter {name!r}: value of type {type(value).__name__} is not a plain literal "
                "(expected str, int, float, bool, None or a list/dict of those)")
        lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


def inject_parameters(nb, parameters: dict):
    """Insert the injected-parameters cell into ``nb`` (an ``nbformat.NotebookNode``), in place.

    A previously injected cell is replaced. Returns ``nb``.
    """
    import nbformat

    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    cell = nbformat.v4.new_code_cell(parameters_source(parameters))
    cell.metadata["tags"] = [INJECTED_TAG]
    pos = 0
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and PARAMETERS_TAG in c.get("metadata", {}).get("tags", []):
            pos = i + 1
            break
    nb.cells.insert(pos, cell)
    return nb


def _write_atomic(nb, path: Path) -> None:
    import nbformat

    with atomic_write(path) as fh:
        nbformat.write(nb, fh)


def execute_notebook(source: str | Path, destination: str | Path, parameters: dict | None = None,
                     cwd: str | Path | None = None, timeout: int = 600,
                     kernel_name: str = "python3") -> Path:
    """Run every cell of ``source`` in a fresh kernel and write the executed notebook to ``destination``.

    Args:
        source: the notebook to run (nbformat 4 JSON); it is not modified.
        destination: where the executed copy goes (written atomically; parent folders are created).
        parameters: values for the injected-parameters cell (see the module docstring), or None.
        cwd: working directory of the kernel (default: the current directory). Relative paths in the
            notebook and in ``parameters`` resolve against it.
        timeout: seconds one cell may run before it is interrupted.
        kernel_name: the Jupyter kernel spec (``python3`` is the interpreter running this code).

    Returns:
        ``destination`` as a Path.

    Raises:
        InputError: ``source`` is missing or not a valid notebook, or a parameter is not a literal;
            raised before any kernel starts.
        NotebookExecutionError: a cell raised or timed out. ``destination`` is left untouched; the
            partly executed notebook is written next to it as ``<name>.failed.ipynb``.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise InputError(f"notebook {source}: file does not exist")
    try:
        nb = nbformat.read(source, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # nbformat raises several unrelated types (JSON, validation)
        raise InputError(f"notebook {source}: not a valid nbformat-4 notebook ({err})") from None
    if parameters:
        inject_parameters(nb, parameters)
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        failed = destination.with_name(destination.stem + ".failed.ipynb")
        _write_atomic(nb, failed)
        index = None
        for i, cell in enumerate(nb.cells):
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                index = i
                break
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise NotebookExecutionError(
            f"notebook {source}: cell {index} failed: {first_line} (partly executed copy: {failed})",
            cell_index=index, failed_copy=failed) from None
    _write_atomic(nb, destination)
    return destination


def _parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise InputError(f"-p {text!r}: expected name=value")
    name, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 a cell failed, 2 bad input)."""
    ap = argparse.ArgumentParser(prog="python -m spielbench.notebook", description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("destination")
    ap.add_argument("-p", "--parameter", action="append", default=[], help="name=value (repeatable)")
    ap.add_argument("--cwd", default=None)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    try:
        params = dict(_parse_param(p) for p in args.parameter)
        execute_notebook(args.source, args.destination, params, cwd=args.cwd, timeout=args.timeout)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NotebookExecutionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
