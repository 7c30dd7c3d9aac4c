"""``python -m singan_insert`` runs the command line."""

import sys

from singan_insert.cli import main

sys.exit(main())
