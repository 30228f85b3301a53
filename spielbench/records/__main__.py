"""``python -m spielbench.records [FILE ...]``: print the JSON schema of each record (all when none named).

FILE is a key of :data:`spielbench.records.RECORDS` (``metrics.json``, ``eval.json``, ``benchmark``,
``runs/index.json``, ``adapter/diverged.json``). Exit status 2 for an unknown name.
"""
import json
import sys

from spielbench.errors import InputError, exit_status
from spielbench.records import RECORDS


def _main() -> int:
    names = sys.argv[1:] or list(RECORDS)
    unknown = [n for n in names if n not in RECORDS]
    if unknown:
        raise InputError(f"unknown record {unknown[0]!r}; known: {', '.join(RECORDS)}")
    print(json.dumps({n: RECORDS[n].json_schema() for n in names}, indent=2))
    return 0


sys.exit(exit_status(_main))
