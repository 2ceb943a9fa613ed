"""``python -m keepax`` runs the command line."""

import sys

from keepax.cli import main

sys.exit(main())
