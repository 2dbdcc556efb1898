"""``python -m winattn`` and ``torchrun -m winattn train ...``."""

import sys

from winattn.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
