"""``python -m fusionseg ...``: the same command line as the ``fusionseg`` script."""
import sys

from .cli import main

sys.exit(main())
