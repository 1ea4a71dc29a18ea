"""``python -m optisplit`` runs the command line."""

import sys

from optisplit.cli import main

sys.exit(main())
