"""`python -m lmforge ...` runs the command line (also what torchrun launches)."""

import sys

from lmforge.cli import main

sys.exit(main())
