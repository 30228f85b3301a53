"""``python -m spielbench.aggregate``: the command line of :mod:`spielbench.aggregate.cli`."""
import sys

from spielbench.aggregate.cli import main

sys.exit(main())
