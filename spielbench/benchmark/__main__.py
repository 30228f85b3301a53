"""``python -m spielbench.benchmark``: see :mod:`spielbench.benchmark.cli`."""
import sys

from spielbench.benchmark.cli import main

sys.exit(main())
