"""Execute a Jupyter notebook headlessly (nbclient + nbformat), with parameters injected by papermill.

The pipeline's ``figures`` rule runs ``analysis/figures.ipynb`` through :func:`execute_notebook`, so
the figures in ``results/figures/`` are always drawn by the notebook a reader opens, from the data the
pipeline just wrote (no jupyter command-line tool is needed).

Parameters go in through papermill's ``parameterize_notebook``: the notebook marks one code cell
with the tag ``parameters`` (its assignments are the defaults); a new cell tagged
``injected-parameters`` is inserted right after it (first, without a tagged cell; a previously
injected cell is replaced) with one assignment per value, and the values are recorded in the
notebook's ``metadata.papermill.parameters``. The cells then run in nbclient's kernel here rather
than through ``papermill.execute_notebook``, so that the executed copy is written atomically only
when every cell succeeded and a failure leaves the partly executed notebook next to it.

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

from spielbench.errors import InputError, exit_status
from spielbench.fsio import write_text_atomic

#: Tag of the notebook cell that holds the parameter defaults (papermill's convention).
PARAMETERS_TAG = "parameters"
#: Tag papermill gives the cell it inserts with the given values.
INJECTED_TAG = "injected-parameters"
#: First line (a comment) of the injected cell.
INJECTED_COMMENT = "Parameters injected by spielbench.notebook"


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


def _plain(name: str, value):
    """``value`` as papermill's Python translator writes it faithfully (a ``Path`` becomes its str);
    ``InputError`` naming the parameter for anything else (papermill would write its ``str()``)."""
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(name, v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(name, v) for k, v in value.items()}
    raise InputError(
        f"notebook parameter {name!r}: value of type {type(value).__name__} is not a plain literal "
        "(expected str, int, float, bool, None or a list/dict (str keys) of those)")


def check_parameters(parameters: dict) -> dict:
    """The parameters as plain values (``Path`` -> str, tuple -> list), checked before any kernel starts.

    Raises:
        InputError: a name is not a Python identifier, or a value is not a plain literal
            (str, int, float, bool, None, or lists/tuples/dicts with str keys of those).
    """
    out = {}
    for name, value in parameters.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise InputError(f"notebook parameter {name!r}: expected a Python identifier as the name")
        out[name] = _plain(name, value)
    return out


def inject_parameters(nb, parameters: dict, kernel_name: str = "python3"):
    """Insert the injected-parameters cell into ``nb`` (an ``nbformat.NotebookNode``) with papermill.

    The values are checked first (:func:`check_parameters`); papermill's Python translator writes
    them (``name = "text"``, ``n = 3``, ``x = float('nan')``). A previously injected cell is
    replaced. Returns the parameterized notebook (``nb`` itself for an nbformat-4 notebook).
    """
    from papermill.parameterize import parameterize_notebook

    values = check_parameters(parameters)
    nb.metadata.setdefault("papermill", {})
    # papermill reads every cell's tags (its own loader gives each cell an empty list); give them only
    # for the call, so that the executed copy keeps the source's cell metadata
    untagged = [c for c in nb.cells if "tags" not in c.metadata]
    for cell in untagged:
        cell.metadata["tags"] = []
    try:
        return parameterize_notebook(nb, values, comment=INJECTED_COMMENT, kernel_name=kernel_name,
                                     language="python")
    finally:
        for cell in untagged:
            if not cell.metadata.get("tags"):
                del cell.metadata["tags"]


def _write_notebook(nb, path: Path) -> None:
    """``nb`` as nbformat JSON (what ``nbformat.write`` gives) to ``path``, atomically."""
    import nbformat

    text = nbformat.writes(nb)
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


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
        nb = inject_parameters(nb, parameters, kernel_name=kernel_name)
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        failed = destination.with_name(destination.stem + ".failed.ipynb")
        _write_notebook(nb, failed)
        index = None
        for i, cell in enumerate(nb.cells):
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                index = i
                break
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise NotebookExecutionError(
            f"notebook {source}: cell {index} failed: {first_line} (partly executed copy: {failed})",
            cell_index=index, failed_copy=failed) from None
    _write_notebook(nb, destination)
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


def _run(args: argparse.Namespace) -> int:
    """Execute the notebook the arguments name; a failing cell is printed and gives status 1."""
    params = dict(_parse_param(p) for p in args.parameter)
    try:
        execute_notebook(args.source, args.destination, params, cwd=args.cwd, timeout=args.timeout)
    except NotebookExecutionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 a cell failed, 2 bad input)."""
    ap = argparse.ArgumentParser(prog="python -m spielbench.notebook", description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("destination")
    ap.add_argument("-p", "--parameter", action="append", default=[], help="name=value (repeatable)")
    ap.add_argument("--cwd", default=None)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args(argv)
    return exit_status(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
