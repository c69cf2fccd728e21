"""`python -m edgemoe.cli VERB ...`: the `edgemoe` command without its console script."""

import sys

from . import main

sys.exit(main())
