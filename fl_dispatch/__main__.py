"""``python -m fl_dispatch`` runs the CLI."""

import sys

from .tools.cli import main

sys.exit(main())
