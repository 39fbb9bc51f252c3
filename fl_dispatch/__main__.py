"""``python -m fl_dispatch`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
