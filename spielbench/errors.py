"""Error types shared by the harness, and the one way a command line ends on bad input."""
from __future__ import annotations

import sys
from typing import Callable



class InputError(ValueError):
    """Bad user input (config field, data file, path).

    The message names the offending field, file or line and what was expected. Command-line
    entry points catch it, print ``error: <message>`` to stderr and exit with status 2 before
    any expensive work (model loading, training) has started.
    """


def exit_status(run: Callable[[], int]) -> int:
    """Run a command's body and return its exit status; an :class:`InputError` from it is printed as
    ``error: <message>`` on stderr and gives status 2 (other exceptions propagate)."""
    try:
        return run()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
