"""``python -m foam_hf``: the same as the ``foam-hf`` console script."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
