"""`python -m expertyard ...`: the same as the `expertyard` command."""

import sys

from expertyard.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
