"""``python -m stableflows`` = the ``stableflows`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
