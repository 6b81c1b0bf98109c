"""`python -m moebius ...` runs the `moebius` command (torchrun starts the package this way)."""

import sys

from moebius.cli import main

if __name__ == "__main__":
    sys.exit(main())
