"""`python -m scalesparse ...` (what `scalesparse submit` runs on the cluster)."""

import sys

from scalesparse.cli import main

sys.exit(main())
