"""``python -m spielbench.assets``: see :mod:`spielbench.assets.cli`."""
import sys

from spielbench.assets.cli import main

sys.exit(main())
