"""Error types shared by the harness."""


class InputError(ValueError):
    """Bad user input (config field, data file, path).

    The message names the offending field, file or line and what was expected. Command-line
    entry points catch it, print ``error: <message>`` to stderr and exit with status 2 before
    any expensive work (model loading, training) has started.
    """
