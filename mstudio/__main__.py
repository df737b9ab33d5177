"""``python -m mstudio``: the ``mstudio`` command."""

import sys

from mstudio.cli import main

sys.exit(main())
