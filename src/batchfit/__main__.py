"""`python -m batchfit` (also how torchrun starts batchfit)."""

import sys

from batchfit.cli.main import main

sys.exit(main())
