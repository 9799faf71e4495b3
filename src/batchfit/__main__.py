"""`python -m batchfit` (also how torchrun starts batchfit)."""

import sys

from batchfit.cli import main

sys.exit(main())
