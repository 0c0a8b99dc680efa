"""`python -m lmforge.cli` (as `python -m lmforge` and the `lmforge` command)."""

import sys

from lmforge.cli import main

sys.exit(main())
