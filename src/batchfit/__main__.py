"""`python -m batchfit` (also how torchrun starts batchfit)."""

import sys

from batchfit.cli.commands import main

sys.exit(main())
