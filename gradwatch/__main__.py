"""``python -m gradwatch`` runs the ``gradwatch`` command."""

import sys

from gradwatch.cli import main

sys.exit(main())
