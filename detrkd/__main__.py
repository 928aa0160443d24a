"""``python -m detrkd`` runs the ``detrkd`` command."""

import sys

from detrkd.cli import main

sys.exit(main())
