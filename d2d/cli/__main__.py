"""`python -m d2d.cli ...`, as the `d2d` console script."""

import sys

from d2d.cli import main

sys.exit(main())
